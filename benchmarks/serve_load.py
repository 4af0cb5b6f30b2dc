"""Load test of ``matformer serve``: bounded, loopback only, servers in their own processes.

Scenarios (each a fixed number of requests from a fixed number of concurrent clients; every
request streams a chat completion of ``--new-tokens`` tokens past end-of-text, greedy):

1. ``XL only``: one server, every request for XL.
2. ``mixed, one copy``: the same server, requests cycling S/M/L/XL (one weight copy, one
   mixed-width batch).
3. ``mixed, 4 processes``: the same mixed workload sent to four single-size servers (what
   serving four sizes costs without nesting): memory and throughput side by side.
4. ``rising load``: 1, 2, 4, ... concurrent clients; fixed XL vs ``auto`` with a per-token
   latency target, on the same server.

Reported per submodel that answered: requests, throughput (generated tokens / wall time of the
scenario), p50/p95/p99 of request latency, time to first token and time per output token
(TPOT: (latency - TTFT) / (tokens - 1)); server memory from ``/proc/PID/status`` (VmRSS after
the run, VmHWM the peak). With a few dozen requests, p99 is close to the maximum: read it as
such.

    .venv/bin/python benchmarks/serve_load.py                    # demo-shaped random model
    .venv/bin/python benchmarks/serve_load.py --checkpoint runs/demo --latency-target-ms 15
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch

SIZES = ("S", "M", "L", "XL")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(rest.split()[0]) / 1024
    return fields


@contextlib.contextmanager
def server(ckpt: Path, *extra: str, threads: int) -> Iterator[tuple[str, int]]:
    """A ``matformer serve`` subprocess on a free loopback port; always terminated (SIGINT:
    it finishes what runs, then exits)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "matformer", "--threads", str(threads), "serve", str(ckpt),
           "--port", str(port), "--name", "demo", "--max-batch", "8", "--queue", "256", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # bounded: up to 2 min for torch import + latency probe
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError("server did not come up")
        yield url, proc.pid
    finally:
        proc.send_signal(2)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: str, n: int
               ) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft, tokens, answered = None, 0, None
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "model": model}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            answered = chunk["model"]
            if ttft is None:  # the role chunk: sent once the prompt is prefilled
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    t = time.perf_counter() - t0
    return {"status": 200, "model": answered, "latency": t, "ttft": ttft, "tokens": tokens,
            "tpot": (t - ttft) / max(1, tokens - 1)}


async def _load(jobs: list[tuple[str, str]], concurrency: int, n: int) -> tuple[list, float]:
    """Run ``jobs`` (url, model) with ``concurrency`` clients; results and wall time."""
    queue: asyncio.Queue[tuple[int, str, str]] = asyncio.Queue()
    for i, (url, model) in enumerate(jobs):
        queue.put_nowait((i, url, model))
    results: list[dict[str, Any]] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i, url, model = queue.get_nowait()
            results.append(await _one(client, url, model, f"request {i}: tell me a story.", n))

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return results, time.perf_counter() - t0


def interleaved(plan: list[tuple[str, list[tuple[str, str]], int]], rounds: int, n: int
                ) -> dict[str, tuple[list[dict[str, Any]], float]]:
    """Run each scenario of ``plan`` (name, jobs, clients) once per round, alternating the
    order, so that load from other jobs on the machine falls on all of them alike."""
    acc: dict[str, tuple[list[dict[str, Any]], float]] = {name: ([], 0.0) for name, *_ in plan}
    for r in range(rounds):
        for name, jobs, clients in plan if r % 2 == 0 else plan[::-1]:
            res, wall = asyncio.run(_load(jobs, clients, n))
            acc[name] = (acc[name][0] + res, acc[name][1] + wall)
    return acc


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def summarise(name: str, results: list[dict[str, Any]], wall: float) -> list[dict[str, Any]]:
    ok = [r for r in results if r["status"] == 200]
    rows = []
    for model in [None, *sorted({r["model"] for r in ok})]:
        rs = [r for r in ok if model is None or r["model"] == model]
        lat, tpot = [r["latency"] * 1e3 for r in rs], [r["tpot"] * 1e3 for r in rs]
        ttft = [r["ttft"] * 1e3 for r in rs]
        rows.append({"scenario": name, "model": model or "all", "requests": len(rs),
                     "failed": len(results) - len(ok) if model is None else 0,
                     "tok_per_s": sum(r["tokens"] for r in rs) / wall,
                     **{f"lat_p{q}": _pct(lat, q) for q in (50, 95, 99)},
                     "ttft_p50": statistics.median(ttft),
                     **{f"tpot_p{q}": _pct(tpot, q) for q in (50, 95, 99)}})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| scenario | model | req | tok/s | latency p50 / p95 / p99 (ms) | TTFT p50 (ms) | "
            "TPOT p50 / p95 / p99 (ms) |\n|---|---|---:|---:|---|---:|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['model']} | {r['requests']} | "
                     f"{r['tok_per_s']:.0f} | {r['lat_p50']:.0f} / {r['lat_p95']:.0f} / "
                     f"{r['lat_p99']:.0f} | {r['ttft_p50']:.0f} | {r['tpot_p50']:.1f} / "
                     f"{r['tpot_p95']:.1f} / {r['tpot_p99']:.1f} |")
    return "\n".join(lines)


def make_checkpoint(out: Path) -> Path:
    """A demo-shaped MatFormer (6 layers, d 256, d_ff 1024, vocab 4096) with random weights:
    serving speed does not depend on what the weights are."""
    from matformer.checkpoint import save_checkpoint
    from matformer.config import preset
    from matformer.model import MatFormerLM
    from matformer.tokenizer import Tokenizer

    torch.manual_seed(0)
    return save_checkpoint(out / "demo", MatFormerLM(preset("demo", vocab_size=4096)),
                           Tokenizer.byte_level())


def main() -> None:
    torch.set_flush_denormal(True)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="default: a demo-shaped random model")
    p.add_argument("--requests", type=int, default=32, help="requests per fixed scenario")
    p.add_argument("--concurrency", type=int, default=8, help="clients in scenarios 1-3")
    p.add_argument("--levels", default="1,2,4,8,16", help="clients in scenario 4")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--context", type=int, help="serve --context (default: the model's)")
    p.add_argument("--latency-target-ms", type=float, default=25.0,
                   help="auto's per-token latency target in scenario 4")
    p.add_argument("--threads", type=int, default=1, help="torch threads per server")
    p.add_argument("--rounds", type=int, default=4,
                   help="scenarios 1-3 run interleaved in this many rounds (a busy machine "
                   "slows them alike)")
    p.add_argument("--skip-processes", action="store_true", help="skip scenario 3")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--plot", type=Path, help="plot the rising-load scenario here (png)")
    args = p.parse_args()
    n, c = args.new_tokens, args.concurrency
    tmp = tempfile.TemporaryDirectory(prefix="serve-load-")
    ckpt = args.checkpoint or make_checkpoint(Path(tmp.name))
    rows: list[dict[str, Any]] = []
    mem: dict[str, Any] = {}
    print(f"# serve_load {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, {args.threads} thread(s)/server,"
          f" {n} new tokens/request, max batch 8", flush=True)
    with contextlib.ExitStack() as stack:
        ctx = ["--context", str(args.context)] if args.context else []
        url, pid = stack.enter_context(server(ckpt, "--latency-target-ms",
                                              str(args.latency_target_ms), *ctx,
                                              threads=args.threads))
        models = httpx.get(url + "/v1/models").json()["data"]
        print("submodels: " + ", ".join(
            f"{m['id']} ({m['params'] / 1e6:.2f}M, decode {m['latency_ms']['decode_ms']:.2f} ms)"
            for m in models if m.get("latency_ms")), flush=True)
        per_round = max(1, args.requests // args.rounds)
        plan = [("XL only", [(url, "demo-XL")] * per_round, c),
                ("mixed, one copy", [(url, f"demo-{SIZES[i % 4]}") for i in range(per_round)], c)]
        pids = [pid]
        if not args.skip_processes:
            urls = {}
            for s in SIZES:
                urls[s], p_ = stack.enter_context(server(ckpt, *ctx, threads=args.threads))
                pids.append(p_)
            plan.append(("mixed, 4 processes", [(urls[SIZES[i % 4]], f"demo-{SIZES[i % 4]}")
                                                for i in range(per_round)], c))
        for _, jobs, _ in plan:  # warm-up every server
            asyncio.run(_load(jobs[:4], 4, 4))
        for name, (res, wall) in interleaved(plan, args.rounds, n).items():
            rows += summarise(name, res, wall)
        mem["one server (all sizes)"] = _mem_mb(pid)
        if not args.skip_processes:
            per = [_mem_mb(p_) for p_ in pids[1:]]
            mem["4 single-size servers (sum)"] = {k: sum(m[k] for m in per) for k in per[0]}
        for level in [int(v) for v in args.levels.split(",")]:
            jobs = max(4, 2 * level)
            plan = [(f"{level} clients, {model}", [(url, model)] * jobs, level)
                    for model in ("demo-XL", "auto")]
            for name, (res, wall) in interleaved(plan, 2, n).items():
                rows += [r for r in summarise(name, res, wall)
                         if r["model"] == "all" or name.endswith("auto")]
            print(f"{level} clients done", flush=True)
        metrics = httpx.get(url + "/metrics").text
    print(table(rows))
    print("\nserver memory (MB): " + "; ".join(
        f"{k}: RSS {v['VmRSS']:.0f}, peak {v['VmHWM']:.0f}" for k, v in mem.items()))
    auto = Counter()
    for line in metrics.splitlines():
        if line.startswith("matformer_requests_total{"):
            auto[line.split('submodel="')[1].split('"')[0]] += float(line.rsplit(" ", 1)[1])
    print("requests by submodel over the whole first server run: "
          + ", ".join(f"{k} {v:.0f}" for k, v in sorted(auto.items())))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "memory_mb": mem}, indent=1))
    if args.plot:
        plot(rows, args.plot, args.latency_target_ms)


def plot(rows: list[dict[str, Any]], path: Path, target: float) -> None:
    """Rising load: per-token latency and request latency against clients, XL vs auto."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for model, marker, color in (("demo-XL", "o", "tab:blue"), ("auto", "s", "tab:green")):
        pts = [(int(r["scenario"].split()[0]), r) for r in rows if r["model"] == "all"
               and r["scenario"].endswith(f"clients, {model}")]
        xs = [c for c, _ in pts]
        for ax, key in ((axes[0], "tpot"), (axes[1], "lat")):
            ax.plot(xs, [r[f"{key}_p50"] for _, r in pts], marker=marker, color=color,
                    label=f"{model} p50")
            ax.plot(xs, [r[f"{key}_p95"] for _, r in pts], marker=marker, color=color, alpha=0.35,
                    ls="--", label=f"{model} p95")
    axes[0].axhline(target, color="gray", ls="--", lw=1, label="auto's target")
    for ax, title in zip(axes, ("time per output token (ms)", "request latency (ms)"),
                         strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
