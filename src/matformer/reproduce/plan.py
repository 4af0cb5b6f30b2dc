"""What a reproduction trains and compares, and the paper's numbers (arXiv 2310.07707).

**Matching rule (the paper's, sec. 3.2):** equal total training compute. Each dense baseline
S/M/L/XL trains on X tokens; a MatLM trains on 4X tokens, one granularity per step, so its
compute equals that of the four baselines together. ``joint`` trains all four granularities on
each of X tokens: again the four baselines' compute. **Equal-tokens control:** dense S and XL
trained on the MatLM's full 4X tokens show what sharing the weights costs each model.

Every run of one seed uses that seed for its initial weights (a baseline XL starts from the
MatLM's very weights), its batches (the same windows in the same order) and its granularity
draws, and the same hyper-parameters; warm-up and cosine decay span each run's own steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import PRESETS, ModelConfig, dataclass_from_dict, preset

#: Sampling probabilities of the paper's Table 6 that up-weight XL (S/M/L/XL).
XL_UP_PROBS = (0.17, 0.20, 0.22, 0.41)

#: Model shapes made for reproductions on CPUs, beside the package's presets.
SHAPES: dict[str, dict[str, Any]] = {
    "repro": dict(d_model=128, n_layer=4, n_head=4, d_ff=512, max_seq_len=64),
    "quick": dict(d_model=32, n_layer=2, n_head=2, d_ff=128, max_seq_len=32),
    # the narrower sizes of the scaling study (`--scaling`), half and three quarters as wide
    "repro-64": dict(d_model=64, n_layer=4, n_head=4, d_ff=256, max_seq_len=64),
    "repro-96": dict(d_model=96, n_layer=4, n_head=4, d_ff=384, max_seq_len=64),
    "quick-16": dict(d_model=16, n_layer=2, n_head=2, d_ff=64, max_seq_len=32),
    "quick-24": dict(d_model=24, n_layer=2, n_head=2, d_ff=96, max_seq_len=32),
}
#: The sizes of the scaling study for a main shape, narrowest first, the main shape last.
SCALING_SHAPES = {"repro": ("repro-64", "repro-96", "repro"),
                  "quick": ("quick-16", "quick-24", "quick")}


@dataclass(frozen=True)
class Recipe:
    """One way to train a nested model: a training mode and its options.

    ``tokens`` is the token budget in units of X (one baseline's budget)."""

    name: str
    mode: str
    tokens: int
    description: str
    probs: tuple[float, ...] | None = None
    distill: bool = False


RECIPES: dict[str, Recipe] = {
    "sample": Recipe("sample", "sample", 4, "uniform sampling, one granularity per step "
                     "(the paper's recipe)"),
    "xl-up": Recipe("xl-up", "sample", 4, "sampling up-weighted to XL, p = .17/.20/.22/.41 "
                    "(the paper's Table 6)", probs=XL_UP_PROBS),
    "distill": Recipe("distill", "sample", 4, "uniform sampling + self-distillation from the "
                      "full model in the same step (not in the paper)", distill=True),
    "joint": Recipe("joint", "joint", 1, "all four granularities on every batch, X tokens "
                    "(the 2023 arXiv recipe; the four baselines' compute)"),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run: a recipe of the nested model, or a dense baseline at one width."""

    name: str
    kind: str  # "matlm" | "baseline" | "control"
    mode: str
    steps: int
    granularity: str | None = None
    probs: tuple[float, ...] | None = None
    distill: float = 0.0


@dataclass(frozen=True)
class ReproConfig:
    """Everything a reproduction depends on; saved with its results, reused on resume.

    Attributes:
        shape: Model shape: one of :data:`SHAPES` or a package preset (``demo``, ``paper-78m``).
        data: Corpus spec (embedded name, file, directory or glob).
        tokenizer: ``bpe`` (trained on the training split) or ``byte``.
        vocab_size: BPE vocabulary size.
        base_steps: X, one baseline's budget, in optimizer steps of ``batch_size`` x
            ``seq_len`` tokens.
        seeds: Independent repetitions (seeds 0 .. seeds-1) of every run.
        recipes: Nested-model recipes from :data:`RECIPES`; ``sample`` is always first.
        distill: Self-distillation weight of the ``distill`` recipe.
        eval_batches / consistency_batches / sweep_batches: Validation batches per measure.
        spec_prompts / spec_prompt_len / spec_new_tokens / draft_len: Speculative decoding:
            held-out prefixes, their length, tokens generated from each, tokens per draft.
        timing_repeats: Interleaved rounds of every timed measurement (median).
    """

    shape: str = "repro"
    data: str = "shakespeare"
    tokenizer: str = "bpe"
    vocab_size: int = 1024
    val_fraction: float = 0.1
    base_steps: int = 150
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    seeds: int = 3
    recipes: tuple[str, ...] = ("sample", "xl-up", "distill", "joint")
    distill: float = 0.5
    precision: str = "fp32"
    eval_batches: int = 32
    consistency_batches: int = 16
    sweep_batches: int = 16
    spec_prompts: int = 8
    spec_prompt_len: int = 16
    spec_new_tokens: int = 32
    draft_len: int = 4
    timing_repeats: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "recipes", tuple(self.recipes))
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown:
            raise ValueError(f"unknown recipe(s) {unknown}; choose from {sorted(RECIPES)}")
        if "sample" not in self.recipes:
            object.__setattr__(self, "recipes", ("sample", *self.recipes))
        elif self.recipes[0] != "sample":
            object.__setattr__(self, "recipes",
                               ("sample", *(r for r in self.recipes if r != "sample")))
        if self.shape not in SHAPES and self.shape not in PRESETS:
            raise ValueError(f"ReproConfig.shape={self.shape!r}: choose one of "
                             f"{sorted(SHAPES) + sorted(PRESETS)}")
        for name in ("base_steps", "batch_size", "seq_len", "seeds", "eval_batches",
                     "consistency_batches", "sweep_batches", "spec_prompts", "spec_prompt_len",
                     "spec_new_tokens", "draft_len", "timing_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReproConfig.{name}={getattr(self, name)} must be >= 1")
        if not 0 < self.distill <= 1:
            raise ValueError(f"ReproConfig.distill={self.distill} must be in (0, 1]")
        if self.tokenizer not in ("bpe", "byte"):
            raise ValueError(f"ReproConfig.tokenizer={self.tokenizer!r}: 'bpe' or 'byte'")

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The nested model's shape (the paper's S/M/L/XL = d_ff/8, /4, /2, 1)."""
        if self.shape in SHAPES:
            return ModelConfig(vocab_size=vocab_size, **SHAPES[self.shape])
        return preset(self.shape, vocab_size=vocab_size)

    def runs(self) -> list[RunSpec]:
        """Every training run of one seed, nested recipes first, then baselines and controls."""
        x = self.base_steps
        out = []
        for name in self.recipes:
            r = RECIPES[name]
            out.append(RunSpec(name, "matlm", r.mode, r.tokens * x, probs=r.probs,
                               distill=self.distill if r.distill else 0.0))
        names = ("S", "M", "L", "XL")
        out += [RunSpec(f"base-{g}", "baseline", "baseline", x, granularity=g) for g in names]
        out += [RunSpec(f"base-{g}-4x", "control", "baseline", 4 * x, granularity=g)
                for g in ("S", "XL")]
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReproConfig:
        return dataclass_from_dict(cls, data)


def quick_config(**changes: Any) -> ReproConfig:
    """A reproduction that runs in a few minutes on 2 CPU cores (numbers meaningless)."""
    base = dict(shape="quick", tokenizer="byte", base_steps=12, batch_size=8, seq_len=32, seeds=1,
                recipes=("sample", "distill"), eval_batches=4, consistency_batches=2,
                sweep_batches=2, spec_prompts=2, spec_prompt_len=8, spec_new_tokens=8,
                timing_repeats=1)
    return ReproConfig(**{**base, **changes})


# ----------------------------------------------------------------------------- the paper
#: Validation loss S/M/L/XL of the 850M models (arXiv 2310.07707, Table 6 / Table 13).
PAPER_LOSS = {
    "baseline": (3.017, 2.971, 2.910, 2.840),
    "sample": (2.970, 2.934, 2.886, 2.846),
    "xl-up": (3.010, 2.943, 2.884, 2.829),
}
#: Speculative decoding speed-ups over plain XL decoding, 850M XL (Table 2: LAMBADA, TriviaQA).
PAPER_SPEEDUP = {"baseline": (1.10, 1.08), "two-cache": (1.14, 1.11),
                 "shared-cache": (1.16, 1.14)}
#: Scaling fits Loss(N, D) = a (N D)^b + c over all submodels (sec. 6).
PAPER_SCALING = {"baseline": (14.08, -0.10, 0.89), "matlm": (21.60, -0.13, 1.33)}
#: Consistency (sec. 3.4): MatLM submodels up to 11.5% more consistent with their XL.
PAPER_CONSISTENCY_GAIN = 0.115
