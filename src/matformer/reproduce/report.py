"""The reproduction's outputs: ``results.json`` and ``report.md`` (plots: :mod:`.plots`).

Several seeds: every number is a mean with its spread (the sample standard deviation over
seeds), and a difference is called only when its mean exceeds its spread; a paired difference
(recipe minus baseline of the same seed, which shared data order and seed) has its own spread.
With one seed nothing is called: the report says so.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..outputs import write_text_atomic
from ..tokenizer import Tokenizer
from .plan import (
    PAPER_CONSISTENCY_GAIN,
    PAPER_LOSS,
    PAPER_SCALING,
    PAPER_SPEEDUP,
    RECIPES,
    ReproConfig,
)
from .plots import plot_consistency, plot_losses, plot_scaling
from .stages import GRANULARITIES, Stages


def stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean, spread (sample standard deviation; 0 for one value) and the values."""
    vals = [float(v) for v in values]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "sd": sd, "n": len(vals), "values": vals}


def verdict(d: dict[str, Any], smaller: str = "lower", larger: str = "higher") -> str:
    """``lower``/``higher`` when the mean difference exceeds its spread, else ``within
    spread``; ``1 seed`` when there is no spread to compare with."""
    if d["n"] < 2:
        return "1 seed"
    if abs(d["mean"]) <= d["sd"]:
        return "within spread"
    return smaller if d["mean"] < 0 else larger


def _fmt(d: dict[str, Any], digits: int = 3, pct: bool = False) -> str:
    k = 100.0 if pct else 1.0
    s = f"{k * d['mean']:.{digits}f}"
    return s + (f" ± {k * d['sd']:.{digits}f}" if d["n"] > 1 else "")


def environment(device: str) -> dict[str, Any]:
    """Versions and hardware the numbers were measured on."""
    import matformer

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    hw = {"cpu": cpu, "cpu_cores": os.cpu_count(), "device": device,
          "torch_threads": torch.get_num_threads()}
    if device == "cuda" and torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "matformer": getattr(matformer, "__version__", "?"), "platform": platform.platform(),
            "hardware": hw}


# ----------------------------------------------------------------------------- aggregation
def aggregate(rc: ReproConfig, stages: Stages) -> dict[str, Any]:
    """Means and spreads over seeds of every loss, difference, consistency and speed-up."""
    seeds = [s for s in range(rc.seeds) if stages.get(f"speculative-seed{s}") is not None]
    runs = rc.runs()
    ev = {s: {r.name: stages.get(f"eval-seed{s}-{r.name}")["losses"] for r in runs}
          for s in seeds}
    tr = {s: {r.name: stages.get(f"train-seed{s}-{r.name}") for r in runs} for s in seeds}
    losses = {r.name: {g: {**stat([ev[s][r.name][g]["val_loss"] for s in seeds]),
                           "non_embedding_params": ev[seeds[0]][r.name][g][
                               "non_embedding_params"]}
                       for g in ev[seeds[0]][r.name]} for r in runs}

    def minus(recipes: Sequence[str], grans: Sequence[str], other: Callable[[str, str], str]
              ) -> dict[str, dict[str, dict[str, Any]]]:
        """Per recipe and granularity: its loss less run ``other(recipe, g)``'s, with a
        verdict."""
        return {rec: {g: _judged([ev[s][rec][g]["val_loss"] - ev[s][other(rec, g)][g]["val_loss"]
                                  for s in seeds]) for g in grans} for rec in recipes}

    spec = {s: stages.get(f"speculative-seed{s}") for s in seeds}
    training = {r.name: {k: stat([tr[s][r.name][k] for s in seeds])
                         for k in ("train_seconds", "flops")} | {
                    "steps": tr[seeds[0]][r.name]["steps"],
                    "tokens": tr[seeds[0]][r.name]["tokens"], "kind": r.kind}
                for r in runs}
    return {"seeds": seeds, "losses": losses,
            "vs_baseline": minus(rc.recipes, GRANULARITIES, lambda rec, g: f"base-{g}"),
            "vs_sample": minus([r for r in rc.recipes if r != "sample"], GRANULARITIES,
                               lambda rec, g: "sample"),
            "equal_tokens": minus(rc.recipes, ("S", "XL"), lambda rec, g: f"base-{g}-4x"),
            "consistency": _consistency(rc, [stages.get(f"consistency-seed{s}") for s in seeds]),
            "speculative": _speculative([spec[s]["setups"] for s in seeds]),
            "speculative_settings": {k: v for k, v in spec[seeds[0]].items() if k != "setups"},
            "training": training}


def _judged(values: Sequence[float]) -> dict[str, Any]:
    """:func:`stat` of ``values`` with its :func:`verdict`."""
    d = stat(values)
    d["verdict"] = verdict(d)
    return d


def _consistency(rc: ReproConfig, per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Hard/soft consistency over seeds, each recipe's also less the baseline's, judged."""
    out: dict[str, Any] = {
        fam: {g: {m: stat([c[fam][g][m] for c in per_seed]) for m in ("hard", "soft_kl")}
              for g in GRANULARITIES[:-1]} for fam in (*rc.recipes, "baseline")}
    for rec in rc.recipes:
        for g in GRANULARITIES[:-1]:
            for m in ("hard", "soft_kl"):
                out[rec][g][f"{m}_minus_baseline"] = _judged(
                    [c[rec][g][m] - c["baseline"][g][m] for c in per_seed])
    return out


def _speculative(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Every numeric measure of every speculative setup over seeds; whether greedy output
    matched the target's in every seed."""
    setups = per_seed[0]
    out = {k: {m: stat([p[k][m] for p in per_seed]) for m in setups[k]
               if isinstance(setups[k][m], int | float) and not isinstance(setups[k][m], bool)}
           for k in setups}
    for k in setups:
        if "matches_target_greedy" in setups[k]:
            out[k]["matches_target_greedy"] = all(p[k]["matches_target_greedy"] for p in per_seed)
    return out


# ----------------------------------------------------------------------------- plots
def _scaling_lines(study: dict[str, Any] | None) -> list[str]:
    if not study:
        return ["Not run (the scaling stage was not asked for): no fit of Loss = a (N D)^b + c "
                "here."]
    shapes = ", ".join(study["shapes"])
    lines = [f"Sizes {shapes} (seed 0; X grows with the width), every granularity of each; "
             "N = non-embedding parameters, D = training tokens (4X for the MatLM, X for a "
             "baseline). Fit by least squares (grid over b, a and c exact for each b).", "",
             "| family | a | b | c | RMS residual | max residual | points | paper a / b / c |",
             "|---|---|---|---|---|---|---|---|"]
    for fam, name in (("baseline", "dense baselines"), ("matlm", "MatLM (sample)")):
        f, p = study["fits"][fam], PAPER_SCALING[fam]
        lines.append(f"| {name} | {f['a']:.3g} | {f['b']:.3f} | {f['c']:.3f} | "
                     f"{f['rmse']:.4f} | {f['max_abs_residual']:.4f} | {f['points']} | "
                     f"{p[0]} / {p[1]} / {p[2]} |")
    if any(study["fits"][f].get(k) for f in ("baseline", "matlm")
           for k in ("b_at_bound", "c_at_bound")):
        lines += ["", "b or c reached the edge of its range (b in (-1, 0), c in [0, lowest "
                  "loss]) for at least one family: over these sizes the points show too little "
                  "curvature to separate b from c, so the fit describes this range only and "
                  "says nothing about the loss floor."]
    lines += ["", "![scaling](scaling.png)"]
    return lines


# ----------------------------------------------------------------------------- markdown
def _loss_table(rc: ReproConfig, res: dict[str, Any]) -> list[str]:
    L = res["losses"]
    lines = ["| model | tokens | S | M | L | XL | paper (850M) S / M / L / XL |",
             "|---|---|---|---|---|---|---|"]
    paper = {"base": PAPER_LOSS["baseline"], "sample": PAPER_LOSS["sample"],
             "xl-up": PAPER_LOSS["xl-up"]}
    row = [f"**{_fmt(L[f'base-{g}'][g])}**" for g in GRANULARITIES]
    lines.append("| dense baselines (one per size) | X | " + " | ".join(row) + " | "
                 + " / ".join(map(str, paper["base"])) + " |")
    for rec in rc.recipes:
        tok = f"{RECIPES[rec].tokens}X"
        p = paper.get(rec)
        lines.append(f"| MatLM {rec} | {tok} | "
                     + " | ".join(_fmt(L[rec][g]) for g in GRANULARITIES) + " | "
                     + (" / ".join(map(str, p)) if p else "-") + " |")
    lines.append("| dense, equal-tokens control | 4X | " + _fmt(L["base-S-4x"]["S"])
                 + " | - | - | " + _fmt(L["base-XL-4x"]["XL"]) + " | - |")
    sizes = " / ".join(f"{L['sample'][g]['non_embedding_params'] / 1e6:.3f}M"
                       for g in GRANULARITIES)
    lines.append(f"\nNon-embedding parameters S / M / L / XL: {sizes}.")
    return lines


def _delta_table(rc: ReproConfig, res: dict[str, Any]) -> list[str]:
    lines = ["| recipe | ΔS | ΔM | ΔL | ΔXL | paper ΔS / ΔM / ΔL / ΔXL |", "|---|---|---|---|---|---|"]
    for rec in rc.recipes:
        d = res["vs_baseline"][rec]
        p = PAPER_LOSS.get(rec)
        paper = (" / ".join(f"{a - b:+.3f}" for a, b in zip(p, PAPER_LOSS["baseline"],
                                                            strict=True)) if p else "-")
        lines.append(f"| {rec} | " + " | ".join(f"{_fmt(d[g])} ({d[g]['verdict']})"
                                                 for g in GRANULARITIES) + f" | {paper} |")
    return lines


def _vs_sample_table(res: dict[str, Any]) -> list[str]:
    lines = ["| recipe | S | M | L | XL |", "|---|---|---|---|---|"]
    for rec, d in res["vs_sample"].items():
        lines.append(f"| {rec} | " + " | ".join(f"{_fmt(d[g])} ({d[g]['verdict']})"
                                                 for g in GRANULARITIES) + " |")
    return lines


def _equal_table(rc: ReproConfig, res: dict[str, Any]) -> list[str]:
    lines = ["| recipe | XL gap (MatLM XL - dense XL on 4X) | S gap (MatLM S - dense S on 4X) |",
             "|---|---|---|"]
    for rec in rc.recipes:
        e = res["equal_tokens"][rec]
        lines.append(f"| {rec} | {_fmt(e['XL'])} ({e['XL']['verdict']}) | {_fmt(e['S'])} "
                     f"({e['S']['verdict']}) |")
    return lines


def _compute_table(res: dict[str, Any]) -> list[str]:
    lines = ["| run | kind | steps | tokens | training TFLOPs | wall time (s) |",
             "|---|---|---|---|---|---|"]
    for name, t in res["training"].items():
        lines.append(f"| {name} | {t['kind']} | {t['steps']} | {t['tokens']:,} | "
                     f"{t['flops']['mean'] / 1e12:.3g} | {_fmt(t['train_seconds'], 0)} |")
    return lines


def _consistency_table(res: dict[str, Any]) -> list[str]:
    lines = ["| model | hard S / M / L (%) | soft KL S / M / L | hard - baseline S / M / L "
             "(points) |", "|---|---|---|---|"]
    for fam, rows in res["consistency"].items():
        hard = " / ".join(_fmt(rows[g]["hard"], 1, pct=True) for g in GRANULARITIES[:-1])
        soft = " / ".join(_fmt(rows[g]["soft_kl"], 3) for g in GRANULARITIES[:-1])
        diff = ("-" if fam == "baseline" else " / ".join(
            f"{_fmt(rows[g]['hard_minus_baseline'], 1, pct=True)} "
            f"({rows[g]['hard_minus_baseline']['verdict']})" for g in GRANULARITIES[:-1]))
        lines.append(f"| {'dense baselines' if fam == 'baseline' else 'MatLM ' + fam} | {hard} "
                     f"| {soft} | {diff} |")
    return lines


def _spec_table(res: dict[str, Any]) -> list[str]:
    lines = ["| setup | acceptance | tokens / XL forward | tokens/s | speed-up vs its XL | "
             "greedy output = XL's | paper speed-up (LAMBADA / TriviaQA) |",
             "|---|---|---|---|---|---|---|"]
    paper = {"two-cache": PAPER_SPEEDUP["two-cache"], "shared-cache": PAPER_SPEEDUP[
        "shared-cache"], "external": PAPER_SPEEDUP["baseline"]}
    for key, r in res["speculative"].items():
        kind = key.split(":")[1]
        acc = _fmt(r["acceptance"], 1, pct=True) + "%" if "acceptance" in r else "-"
        tpf = _fmt(r["tokens_per_target_forward"], 2) if "tokens_per_target_forward" in r else "1"
        same = {True: "yes", False: "**no**"}.get(r.get("matches_target_greedy"), "-")
        p = paper.get(kind)
        lines.append(f"| {key} | {acc} | {tpf} | {_fmt(r['tokens_per_s'], 0)} | "
                     f"{_fmt(r['speedup'], 2)}x | {same} | "
                     + (f"{p[0]:.2f}x / {p[1]:.2f}x" if p else "1x") + " |")
    return lines


def _mixnmatch_lines(sweep: dict[str, Any] | None) -> list[str]:
    if not sweep:
        return ["(not run)"]
    a = sweep["analysis"]["vs_line"].get("rule")
    lines = ["![Mix'n'Match](mixnmatch/mixnmatch.png)", ""]
    if a:
        lines.append(f"{a['n']} mixed submodels of the paper's rule (non-decreasing with depth, "
                     f"least slope): mean distance to the line joining S-M-L-XL "
                     f"{a['mean']:+.4f} nats (median {a['median']:+.4f}, from {a['min']:+.4f} "
                     f"to {a['max']:+.4f}); {a['fraction_below']:.0%} lie below the line "
                     "(better than interpolating the uniform sizes). The paper: Mix'n'Match "
                     "models lie on the S-M-L-XL curve (arXiv 2310.07707 sec. 3.3, Fig. 3).")
    dec = sweep["analysis"].get("vs_rule_same_widths", {}).get("decreasing")
    if dec:
        lines.append(f"\nThe same widths in decreasing order (wide layers first): loss minus the "
                     f"increasing order's, mean {dec['mean']:+.4f} nats (from {dec['min']:+.4f} "
                     f"to {dec['max']:+.4f}) over {dec['n']} pairs; decreasing is better in "
                     f"{dec['fraction_below']:.0%} of them.")
    lines.append("Full table: [mixnmatch/mixnmatch.md](mixnmatch/mixnmatch.md).")
    return lines


def _claims(rc: ReproConfig, res: dict[str, Any], sweep: dict[str, Any] | None) -> list[str]:
    """One row per claim of the paper: what it reports, what we measured (``sample`` recipe
    unless named), and the verdict by the spread rule."""
    v, L = res["vs_baseline"]["sample"], res["losses"]
    small = ", ".join(f"{g} {_fmt(v[g])} ({v[g]['verdict']})" for g in ("S", "M", "L"))
    xl = v["XL"]["mean"] / L["base-XL"]["XL"]["mean"]
    rows = ["| claim (arXiv 2310.07707) | paper (850M) | ours (MatLM `sample` unless named) |",
            "|---|---|---|",
            f"| S/M/L at or below their dense baselines (Table 6) | -0.047 / -0.037 / -0.024 "
            f"nats | {small} |",
            f"| XL within about 1% of its baseline | +0.006 nats (+0.2%) | "
            f"{_fmt(v['XL'])} nats ({xl:+.1%}; {v['XL']['verdict']}) |"]
    if "xl-up" in res["vs_baseline"]:
        u = res["vs_baseline"]["xl-up"]["XL"]
        rows.append(f"| XL-upweighted sampling closes the XL gap (Table 6) | -0.011 nats | "
                    f"xl-up XL {_fmt(u)} ({u['verdict']}) |")
    a = (sweep or {}).get("analysis", {}).get("vs_line", {}).get("rule")
    if a:
        rows.append(f"| Mix'n'Match lies on the S-M-L-XL curve (sec. 3.3) | on the curve | mean "
                    f"{a['mean']:+.4f} nats from the line, {a['fraction_below']:.0%} below "
                    "(seed 0) |")
    dec = (sweep or {}).get("analysis", {}).get("vs_rule_same_widths", {}).get("decreasing")
    if dec:
        rows.append(f"| increasing widths with depth beat decreasing ones at the same size "
                    f"(App. D) | increasing wins | decreasing minus increasing: mean "
                    f"{dec['mean']:+.4f} nats over {dec['n']} pairs, increasing better in "
                    f"{dec['n'] - round(dec['fraction_below'] * dec['n'])} (seed 0) |")
    c = res["consistency"]["sample"]
    hard = ", ".join(f"{g} {_fmt(c[g]['hard_minus_baseline'], 1, pct=True)} points "
                     f"({c[g]['hard_minus_baseline']['verdict']})" for g in ("S", "M", "L"))
    rows.append(f"| submodels more consistent with XL than baselines (sec. 3.4) | up to "
                f"+{PAPER_CONSISTENCY_GAIN:.1%} | hard agreement {hard} |")
    sp = res["speculative"]
    rows.append(f"| S drafting XL: shared cache > MatLM two caches > baseline pair (Table 2) | "
                f"1.16x > 1.14x > 1.10x | {_fmt(sp['sample:shared-cache']['speedup'], 2)}x, "
                f"{_fmt(sp['sample:two-cache']['speedup'], 2)}x, "
                f"{_fmt(sp['baseline:external']['speedup'], 2)}x (acceptance "
                f"{_fmt(sp['sample:shared-cache']['acceptance'], 0, pct=True)}% vs "
                f"{_fmt(sp['baseline:external']['acceptance'], 0, pct=True)}%) |")
    return rows


def markdown(rc: ReproConfig, res: dict[str, Any], sweep: dict[str, Any] | None,
             meta: dict[str, Any]) -> str:
    """The reproduction's report (``report.md``): setup, claims, tables and plots."""
    text = [
        *_header(meta), *_setup(rc, res, meta),
        "## Claims at a glance", "", *_claims(rc, res, sweep), "",
        "## Validation loss (the paper's Table 6 layout)", "", *_loss_table(rc, res), "",
        "![loss vs parameters](loss_vs_params.png)", "",
        "### MatLM minus its dense baseline (same size), nats", "",
        "Paper's expectation: S/M/L at or below their baselines, XL within about 1%.", "",
        *_delta_table(rc, res), "",
        "### Each recipe minus uniform sampling (paired by seed), nats", "",
        *(_vs_sample_table(res) if res["vs_sample"] else ["(only `sample` was run)"]), "",
        "### Equal-tokens gap: what sharing costs each model", "", *_equal_table(rc, res), "",
        "### Training compute", "", *_compute_table(res), "",
        "## Mix'n'Match", "", *_mixnmatch_lines(sweep), "",
        "## Consistency with XL", "",
        "Hard: % of validation prefixes where the submodel's greedy next token equals its XL's; "
        "soft: KL(XL || submodel). MatLM submodels against their own XL, dense baselines "
        f"against the dense XL. Paper: MatLM submodels up to {PAPER_CONSISTENCY_GAIN:.1%} more "
        "consistent than baselines.", "", *_consistency_table(res), "",
        "![consistency](consistency.png)", "",
        "## Speculative decoding (greedy, batch 1, 1 thread)", "",
        f"{res['speculative_settings']['prompts']} held-out prefixes of "
        f"{res['speculative_settings']['prompt_len']} tokens, "
        f"{res['speculative_settings']['new_tokens']} new tokens each, draft length "
        f"{res['speculative_settings']['draft_len']}; time = median of "
        f"{res['speculative_settings']['repeats']} interleaved rounds per prefix, summed. "
        "Speed-up is against plain decoding with the same XL.", "", *_spec_table(res), "",
        "## Scaling", "", *_scaling_lines(meta.get("scaling")), "",
    ]
    return "\n".join(text)


def _header(meta: dict[str, Any]) -> list[str]:
    env = meta["environment"]
    hw = env["hardware"]
    return [
        "# MatFormer reproduction (arXiv 2310.07707) at small scale", "",
        f"Command: `{meta['command']}`  ",
        f"Finished {meta['finished']}; stage time {meta['stage_seconds'] / 60:.1f} min in all "
        f"(this invocation {meta['invocation_seconds'] / 60:.1f} min).  ",
        f"Versions: Python {env['python']}, torch {env['torch']}, matformer {env['matformer']} "
        f"({env['platform']}).  ",
        f"Hardware: {hw['cpu']}, {hw['cpu_cores']} cores, device {hw['device']}"
        + (f" ({hw['gpu']})" if "gpu" in hw else "") + f", {hw['torch_threads']} torch threads "
        "for training; every speed measured with 1 thread.", ""]


def _setup(rc: ReproConfig, res: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    mcfg = rc.model_config(meta["vocab_size"])
    x_tokens = rc.base_steps * rc.batch_size * rc.seq_len
    seeds = len(res["seeds"])
    return [
        "## Setup", "",
        f"- Model `{rc.shape}`: {mcfg.n_layer} layers, d_model {mcfg.d_model}, {mcfg.n_head} "
        f"heads, FFN {mcfg.activation} d_ff {mcfg.d_ff}; S/M/L/XL = FFN widths "
        + "/".join(str(mcfg.ffn_widths(g)[0]) for g in GRANULARITIES)
        + f"; vocabulary {meta['vocab_size']} ({rc.tokenizer}).",
        f"- Data `{rc.data}`, last {rc.val_fraction:.0%} of every document held out; "
        f"validation on {res['val_tokens']:,} tokens ({rc.eval_batches} batches).",
        f"- X = {rc.base_steps} steps x {rc.batch_size} x {rc.seq_len} = {x_tokens:,} tokens. "
        f"AdamW lr {rc.lr}, weight decay {rc.weight_decay}, warm-up min(50, steps/10) then "
        f"cosine to lr/10, {rc.precision}. Seeds: {seeds} (0..{seeds - 1}).",
        "- **Matching rule (the paper's): equal total training compute.** Each dense baseline "
        "trains on X tokens; a sampled MatLM on 4X (one granularity per step: the compute of "
        "the four baselines together); `joint` on X tokens with all four granularities per "
        "step (also the four baselines' compute). **Equal-tokens control:** dense S and XL on "
        "4X tokens, what the sharing costs each model. Every run of a seed shares that seed's "
        "data order and initialisation (the baseline XL starts from the MatLM's weights).",
        "- Numbers are mean ± spread (sample standard deviation over seeds); a difference is "
        "called (lower/higher) only when its mean exceeds its spread; with one seed nothing "
        "is called.", "",
    ]


def write_all(rc: ReproConfig, out: Path, stages: Stages, *, device: str, command: str,
              seconds: float) -> dict[str, Any]:
    """Aggregate the stages into ``results.json``, ``report.md`` and the two plots."""
    res = aggregate(rc, stages)
    sweep = stages.get("mixnmatch")
    ev0 = stages.get("eval-seed0-sample")
    res["val_tokens"] = ev0["val_tokens"]
    stage_seconds = sum(json.loads(p.read_text()).get("seconds", 0.0)
                        for p in stages.root.glob("*.json"))
    meta = {"command": command, "environment": environment(device),
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "stage_seconds": stage_seconds, "invocation_seconds": seconds,
            "vocab_size": Tokenizer.load(out / "tokenizer.json").vocab_size}
    plots = {"loss_vs_params": plot_losses(res, sweep, out / "loss_vs_params.png"),
             "consistency": plot_consistency(res, out / "consistency.png")}
    study = stages.get("scaling-fit")
    if study:
        plots["scaling"] = plot_scaling(study, out / "scaling.png")
        res["scaling"] = study
    results = {"config": rc.to_dict(), **meta, **res,
               "mixnmatch": None if not sweep else {"analysis": sweep["analysis"],
                                                    "candidates": sweep["candidates"],
                                                    "baselines": sweep["baselines"]},
               "files": {"report": str(out / "report.md"), **{k: str(v) for k, v in
                                                             plots.items()}}}
    write_text_atomic(out / "results.json", json.dumps(results, indent=1, default=_nan) + "\n")
    write_text_atomic(out / "report.md", markdown(rc, res, sweep, {**meta, "scaling": study}))
    return results


def _nan(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else str(v)
