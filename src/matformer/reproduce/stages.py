"""The reproduction as resumable stages: train every run, then measure.

Each stage stores its result as one JSON file under ``OUT/stages/`` (written atomically); a
rerun skips the stages whose file exists, and a training run killed half-way resumes from its
latest checkpoint. Stages, in order, per seed: tokenizer and data (once), every training run,
evaluation of every granularity, consistency, speculative decoding; then the Mix'n'Match sweep
(seed 0, the ``sample`` MatLM, baselines overlaid). :mod:`.run` puts them in order.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as ckpt
from ..data import TokenDataset, load_corpus, prepare_data, split_text
from ..model import MatFormerLM
from ..outputs import make_dir, write_text_atomic
from ..tokenizer import Tokenizer
from .plan import ReproConfig, RunSpec

log = logging.getLogger(__name__)

GRANULARITIES = ("S", "M", "L", "XL")
#: Called with (stage key, "skip" | "start" | "done", seconds) as stages go.
Progress = Callable[[str, str, float], None]


class Stages:
    """Results of finished stages, one JSON file each under ``root``."""

    def __init__(self, root: Path, progress: Progress | None = None) -> None:
        self.root = root
        make_dir(self.root)
        self.progress = progress or (lambda key, what, sec: None)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> Any | None:
        p = self.path(key)
        return json.loads(p.read_text()) if p.is_file() else None

    def run(self, key: str, fn: Callable[[], Any]) -> Any:
        """The stored result of ``key``, or ``fn()``'s, stored atomically (with its seconds)."""
        done = self.get(key)
        if done is not None:
            self.progress(key, "skip", done.get("seconds", 0.0))
            return done
        self.progress(key, "start", 0.0)
        t0 = time.perf_counter()
        result = fn()
        result["seconds"] = time.perf_counter() - t0
        write_text_atomic(self.path(key), json.dumps(result, indent=1) + "\n")
        self.progress(key, "done", result["seconds"])
        log.info("stage %s done in %.1f s", key, result["seconds"])
        return result


# ----------------------------------------------------------------------------- data
def prepare(rc: ReproConfig, out: Path) -> tuple[Tokenizer, TokenDataset]:
    """The tokenizer (trained once on the training split, saved in ``out``) and the data."""
    f = out / "tokenizer.json"
    if not f.is_file():
        if rc.tokenizer == "byte":
            tok = Tokenizer.byte_level()
        else:
            docs = load_corpus(rc.data)
            tok = Tokenizer.train_bpe([split_text(d, rc.val_fraction)[0] for d in docs],
                                      rc.vocab_size, show_progress=False)
        tok.save(f)  # atomic
    tok = Tokenizer.load(f)
    return tok, prepare_data(rc.data, tok, val_fraction=rc.val_fraction)


def val_batches(rc: ReproConfig, data: TokenDataset, n: int) -> list[tuple[torch.Tensor, ...]]:
    return list(data.val_batches(rc.batch_size, rc.seq_len, n))


# ----------------------------------------------------------------------------- training
def train_flops(model_cfg: Any, spec: RunSpec, rc: ReproConfig, seed: int) -> float:
    """Training FLOPs of a run: 3 x forward FLOPs per token (forward + backward) x tokens;
    distillation adds a forward of the full model on the steps that train a smaller one. The
    granularity drawn at each step depends on the seed, as in training."""
    from ..recipe import TrainConfig, granularities_for_step

    tokens = rc.batch_size * rc.seq_len
    cfg = TrainConfig(mode=spec.mode, steps=spec.steps, probs=spec.probs, seed=seed)
    full = model_cfg.flops_per_token(None, rc.seq_len)
    total = 0.0
    for step in range(spec.steps):
        for name, _ in granularities_for_step(step, cfg, model_cfg.names):
            total += 3 * model_cfg.flops_per_token(model_cfg.ffn_widths(name), rc.seq_len)
            if spec.distill and name != model_cfg.names[-1]:
                total += full
    return total * tokens


def train_run(spec: RunSpec, rc: ReproConfig, tokenizer: Tokenizer, data: TokenDataset,
              seed: int, run_dir: Path, device: str) -> dict[str, Any]:
    """Train (or resume) one run; returns its steps, seconds, tokens and FLOPs."""
    from .. import distributed as dist
    from ..task import LMTask
    from ..train import TrainConfig, run

    mcfg = rc.model_config(tokenizer.vocab_size)
    if spec.mode == "baseline":
        mcfg = mcfg.dense(spec.granularity)
    cfg = TrainConfig(mode=spec.mode, data=rc.data, val_fraction=rc.val_fraction,
                      steps=spec.steps, batch_size=rc.batch_size, seq_len=rc.seq_len, lr=rc.lr,
                      warmup_steps=min(50, max(1, spec.steps // 10)),
                      weight_decay=rc.weight_decay, probs=spec.probs, distill=spec.distill,
                      eval_interval=spec.steps, eval_batches=2,
                      ckpt_interval=max(1, min(200, spec.steps // 4)), keep_checkpoints=1,
                      seed=seed, precision=rc.precision, parallel="none")
    torch.manual_seed(seed)  # the same initial weights for every run of a seed and shape
    model = MatFormerLM(mcfg)
    task = LMTask(data, tokenizer, rc.seq_len)
    env = dist.DistEnv(device=torch.device(device))
    resume = (run_dir / ckpt.LATEST).is_file()
    trainer, _, _, seconds = run(model, task, cfg, run_dir, env, resume=resume, progress=False)
    return {"run": spec.name, "kind": spec.kind, "mode": spec.mode, "steps": trainer.step,
            "tokens": trainer.step * rc.batch_size * rc.seq_len, "train_seconds": seconds,
            "resumed": resume, "flops": train_flops(mcfg, spec, rc, seed),
            "params": mcfg.num_params(), "non_embedding_params": mcfg.num_params(embedding=False)}


def load_run(run_dir: Path, device: str) -> MatFormerLM:
    from ..families import load_checkpoint

    model, _ = load_checkpoint(run_dir, device=device)
    return model.eval()


# ----------------------------------------------------------------------------- measures
def evaluate_run(model: MatFormerLM, batches: list, rc: ReproConfig) -> dict[str, Any]:
    """Validation loss and size of every granularity of one run."""
    from ..metrics import evaluate_loss

    cfg = model.config
    rows = {}
    for name in cfg.names:
        w = cfg.ffn_widths(name)
        rows[name] = {"val_loss": evaluate_loss(model, batches, widths=w, precision="fp32"),
                      "params": cfg.num_params(w),
                      "non_embedding_params": cfg.num_params(w, embedding=False)}
    return {"losses": rows, "val_tokens": sum(y.numel() for _, y in batches)}


def consistency(matlms: dict[str, MatFormerLM], bases: dict[str, MatFormerLM],
                batches: list) -> dict[str, Any]:
    """Hard/soft consistency of each MatLM's S/M/L with its XL, and of the dense baselines
    S/M/L with the dense XL (arXiv 2310.07707 sec. 3.4)."""
    from ..metrics import evaluate_consistency, granularity_consistency

    out: dict[str, Any] = {}
    for name, m in matlms.items():
        rows = granularity_consistency(m, batches)
        out[name] = {g: rows[g] for g in GRANULARITIES[:-1]}
    out["baseline"] = evaluate_consistency(
        {g: (bases[g], None) for g in GRANULARITIES[:-1]}, (bases["XL"], None), batches)
    return out


def _prompts(rc: ReproConfig, data: TokenDataset) -> list[torch.Tensor]:
    """``spec_prompts`` held-out prefixes, evenly spaced over the validation split."""
    n = len(data.val) - rc.spec_prompt_len - 1
    starts = [int(i * n / rc.spec_prompts) for i in range(rc.spec_prompts)]
    return [torch.as_tensor(data.val[s: s + rc.spec_prompt_len].astype("int64"))
            for s in starts]


def _time_setups(setups: dict[str, Callable[[torch.Tensor], Any]], prompts: list[torch.Tensor],
                 repeats: int, device: torch.device
                 ) -> tuple[dict[str, list[Any]], dict[str, list[list[float]]]]:
    """Every setup on every prompt, ``repeats`` interleaved rounds on one thread
    (:func:`~matformer.submodels.latency.measure`): the outputs and the seconds per call."""
    from ..submodels.latency import measure

    outs: dict[str, list[Any]] = {k: [None] * len(prompts) for k in setups}
    order = [(key, i) for i in range(len(prompts)) for key in setups]

    def call(key: str, i: int) -> Callable[[], None]:
        def f() -> None:
            outs[key][i] = setups[key](prompts[i])
        return f

    ms = measure([call(key, i) for key, i in order], repeats=repeats, warmup=0, threads=1,
                 device=device)
    times: dict[str, list[list[float]]] = {k: [[] for _ in prompts] for k in setups}
    for (key, i), t in zip(order, ms, strict=True):
        times[key][i] = [v / 1e3 for v in t]
    return outs, times


def speculative(matlms: dict[str, MatFormerLM], bases: dict[str, MatFormerLM],
                rc: ReproConfig, data: TokenDataset) -> dict[str, Any]:
    """Greedy speculative decoding on held-out prefixes, one torch thread, measured here
    (on CUDA the device is synchronised around every timed call).

    Setups: each MatLM's XL alone and S drafting XL (two caches; one shared cache), and the
    dense XL alone and the dense S drafting it. Every setup decodes every prefix in each of
    ``timing_repeats`` interleaved rounds; time is the median per prefix, summed. Speed-up =
    plain XL time / speculative time of the same target. Greedy speculative output must equal
    the target's greedy output (checked).
    """
    from ..generate import generate
    from ..speculative import SpecStats, speculative_generate

    device = next(bases["XL"].parameters()).device
    prompts = [p.to(device) for p in _prompts(rc, data)]
    n_new = min(rc.spec_new_tokens, rc.seq_len - rc.spec_prompt_len + 1)
    setups: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, SpecStats | None]]] = {}

    def plain(m: MatFormerLM) -> Callable[[torch.Tensor], tuple[torch.Tensor, None]]:
        return lambda p: (generate(m, p[None], n_new, temperature=0.0)[0, p.numel():], None)

    def spec(m: MatFormerLM, **kw: Any) -> Callable[[torch.Tensor], tuple[torch.Tensor, Any]]:
        def f(p: torch.Tensor) -> tuple[torch.Tensor, Any]:
            ids, st = speculative_generate(m, p, n_new, temperature=0.0,
                                           draft_len=rc.draft_len, **kw)
            return ids[0, p.numel():], st
        return f

    for name, m in matlms.items():
        setups[f"{name}:XL"] = plain(m)
        setups[f"{name}:two-cache"] = spec(m, draft="S")
        setups[f"{name}:shared-cache"] = spec(m, draft="S", shared_cache=True)
    setups["baseline:XL"] = plain(bases["XL"])
    setups["baseline:external"] = spec(bases["XL"], draft_model=bases["S"])
    outs, times = _time_setups(setups, prompts, rc.timing_repeats, device)
    result: dict[str, Any] = {"prompts": len(prompts), "prompt_len": rc.spec_prompt_len,
                              "new_tokens": n_new, "draft_len": rc.draft_len, "threads": 1,
                              "repeats": rc.timing_repeats, "setups": {}}
    for key in setups:
        seconds = sum(statistics.median(t) for t in times[key])
        tokens = sum(int(o[0].numel()) for o in outs[key])
        row: dict[str, Any] = {"seconds": seconds, "tokens": tokens,
                               "tokens_per_s": tokens / seconds if seconds else math.nan}
        stats = [o[1] for o in outs[key] if o[1] is not None]
        if stats:
            drafted = sum(s.drafted for s in stats)
            row.update(acceptance=sum(s.accepted for s in stats) / drafted if drafted else 0.0,
                       tokens_per_target_forward=sum(s.new_tokens for s in stats)
                       / sum(s.target_forwards for s in stats))
            family = key.split(":")[0]
            ref = outs[f"{family}:XL"]
            row["matches_target_greedy"] = all(torch.equal(a[0], b[0])
                                               for a, b in zip(outs[key], ref, strict=True))
        result["setups"][key] = row
    for key, row in result["setups"].items():
        family = key.split(":")[0]
        row["speedup"] = result["setups"][f"{family}:XL"]["seconds"] / row["seconds"]
    return result


def mixnmatch(model: MatFormerLM, bases: dict[str, MatFormerLM], batches: list,
              rc: ReproConfig, out: Path) -> dict[str, Any]:
    """The Mix'n'Match sweep of one MatLM with the dense baselines overlaid (latency measured
    with one torch thread); writes ``out/mixnmatch.{json,png,md}``. Candidates: the paper's
    rule (non-decreasing with depth, least slope) and, for every mixed one, the same widths in
    decreasing order (the paper found increasing better, arXiv 2310.07707 App. D)."""
    from ..submodels.candidates import candidates
    from ..submodels.report import line_analysis, write_report
    from ..submodels.sweep import lm_sweep

    cands = candidates(model.config, ("rule", "decreasing"))
    baselines = [(f"baseline {g}", bases[g]) for g in GRANULARITIES]
    rows = lm_sweep(model, batches, cands, seq_len=rc.seq_len, baselines=baselines,
                    prefill_len=rc.seq_len, repeats=rc.timing_repeats, threads=1,
                    progress=False)
    result = {"checkpoint": "sample MatLM, seed 0", "candidates": rows[: len(cands)],
              "baselines": rows[len(cands):], "analysis": line_analysis(rows[: len(cands)])}
    files = write_report(result, out, title="Mix'n'Match")
    return {**result, "files": {k: str(v) for k, v in files.items()}}
