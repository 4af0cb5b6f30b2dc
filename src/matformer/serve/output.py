"""Tokens to text for serving: detokenising as tokens arrive, stop strings, end of text.

Pure bookkeeping, no model and no threads: a :class:`TextStream` per request takes each new
token and says which text may be sent now and whether the request is done. Text is held back
while it could still be the start of a stop string, or while the last token ends inside a
multi-byte character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..tokenizer import Tokenizer


@dataclass
class Output:
    """What one token changed: ``text`` to send now, and ``finish`` (``"stop"``,
    ``"length"``) when the request ends with it (``text`` then holds all that is left)."""

    text: str = ""
    finish: str | None = None


@dataclass
class TextStream:
    """One request's generated tokens and how much of their text has been sent.

    Attributes:
        tokenizer: Decodes the tokens; its ``stop_ids`` end the text.
        max_tokens: Tokens after which the request ends (``length``).
        stop: Strings that end the text (not included in it).
        ignore_eos: Keep going past the tokenizer's end tokens.
    """

    tokenizer: Tokenizer
    max_tokens: int
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the decoded text already sent

    def take(self, tok: int) -> Output:
        """Record token ``tok``; the text that can be sent and whether that ends the request."""
        self.tokens.append(tok)
        if tok in self.tokenizer.stop_ids and not self.ignore_eos:
            return self._end("stop", self.tokenizer.decode(self.tokens[:-1]))
        text = self.tokenizer.decode(self.tokens)
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop)
                   if i >= 0), default=-1)
        if cut >= 0:
            return self._end("stop", text[:cut])
        if len(self.tokens) >= self.max_tokens:
            return self._end("length", text)
        safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 sequence: wait for the rest
        hold = 0
        for s in self.stop:  # hold back a tail that may grow into a stop string
            hold = max([hold] + [k for k in range(1, min(len(s), safe + 1))
                                 if text[safe - k:safe] == s[:k]])
        safe -= hold
        if safe <= self.sent:
            return Output()
        out, self.sent = text[self.sent:safe], safe
        return Output(out)

    def _end(self, reason: str, text: str) -> Output:
        out = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return Output(out, reason)
