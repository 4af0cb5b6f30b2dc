"""``matformer serve``: an OpenAI-compatible HTTP server over one loaded checkpoint.

Returns ``(result, text)`` after the server has shut down (see :mod:`matformer.cli.common`).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from pathlib import Path

from .args import POSITIVE, POSITIVE_INT, Number
from .common import Result, add_command

EXAMPLES = """\
examples:
  matformer serve runs/demo                              # http://127.0.0.1:8000/v1 (S/M/L/XL)
  matformer serve runs/demo --sweep runs/demo/mixnmatch  # + the sweep's Pareto-front configs
  matformer serve runs/demo --max-batch 16 --queue 32 --latency-target-ms 20
  curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "demo-S", "prompt": "ROMEO.", "max_tokens": 40}'
"""


def add_serve(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "serve", "OpenAI-compatible HTTP server: every submodel from one weight copy",
        EXAMPLES,
        description="Serve /v1/completions, /v1/chat/completions and /v1/models (plus /health "
        "and /metrics). `model` names a submodel (<run>-S ... <run>-XL, <run>-mix-<size> from "
        "--sweep) or `auto`, which steps down to smaller submodels as the queue grows. Requests "
        "for different submodels are batched together. Ctrl-C finishes running requests, then "
        "exits. See docs/serving.md.")
    p.add_argument("checkpoint", type=Path, help="checkpoint or run directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback; anything else needs --api-key)")
    p.add_argument("--port", type=Number(int, low=0, high=65535), default=8000,
                   help="TCP port (0: any free port)")
    p.add_argument("--sweep", type=Path, help="mixnmatch.json (or its directory): serve its "
                   "Pareto-front Mix'n'Match configs too, with its measured latency")
    p.add_argument("--name", help="prefix of the submodel names (default: the run's name)")
    p.add_argument("--max-batch", type=POSITIVE_INT, default=8, help="requests decoded together")
    p.add_argument("--context", type=POSITIVE_INT,
                   help="positions a request may use, prompt and completion (default: the "
                   "model's; the KV cache holds max-batch x context of them in every layer: "
                   "SmolLM2-135M's 8,192 takes 3 GB for 8 requests, 2,048 a quarter of it)")
    p.add_argument("--queue", type=POSITIVE_INT, default=64,
                   help="requests that may wait for a slot; more get HTTP 429")
    p.add_argument("--latency-target-ms", type=POSITIVE,
                   help="per-token latency `auto` keeps (default: follow the queue only)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1/*")
    p.add_argument("--no-measure", action="store_true",
                   help="do not time submodels the sweep gives no latency for")


def _check(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port={args.port} must be in 0..65535")
    if args.max_batch < 1 or args.queue < 0:
        raise ValueError(f"--max-batch={args.max_batch} must be >= 1 and --queue={args.queue} "
                         ">= 0")
    if args.latency_target_ms is not None and not args.latency_target_ms > 0:
        raise ValueError(f"--latency-target-ms={args.latency_target_ms} must be > 0")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback and not args.api_key:
        raise ValueError(f"--host {args.host} is reachable from other machines: give "
                         "--api-key too (or serve on 127.0.0.1)")


def _check_port(host: str, port: int) -> None:
    """ValueError when nothing can listen on ``host:port`` (in use, or not this machine's)."""
    if port == 0:
        return
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        socket.create_server((host, port), family=family).close()
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e} (another server "
                         "there? choose another --port)") from e


def serve(args: argparse.Namespace) -> Result:
    """Load the checkpoint, serve until SIGINT/SIGTERM, report what was served."""
    try:
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError("matformer serve needs FastAPI and uvicorn: pip install "
                         "'matformer[serve]'") from e
    from ..serve import load_server, run

    _check(args)
    _check_port(args.host, args.port)  # before loading, and before saying "serving"
    logging.getLogger("matformer.serve").setLevel(logging.INFO)
    server = load_server(args.checkpoint, sweep=args.sweep, name=args.name,
                         measure_latency=not args.no_measure, max_batch=args.max_batch,
                         max_queue=args.queue, latency_target_ms=args.latency_target_ms,
                         api_key=args.api_key, context=args.context)
    names = list(server.submodels)
    print(f"serving {', '.join(names)}, auto on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    run(server, args.host, args.port)
    done = server.metrics.render()
    served = sum(float(line.rsplit(" ", 1)[1]) for line in done.splitlines()
                 if line.startswith("matformer_requests_total{"))
    return ({"submodels": names, "requests": served},
            f"served {served:.0f} requests; shut down cleanly")
