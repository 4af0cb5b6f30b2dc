"""Elastic serving: one copy of the weights, every submodel on demand, mixed in one batch.

* :mod:`~matformer.serve.registry` -- the named submodels (S/M/L/XL, a sweep's Pareto front).
* :mod:`~matformer.serve.cache` -- a KV cache whose rows sit at their own positions.
* :mod:`~matformer.serve.scheduler` -- continuous batching of mixed-width requests.
* :mod:`~matformer.serve.policy` -- the load-adaptive ``auto`` model.
* :mod:`~matformer.serve.app` -- the OpenAI-compatible HTTP API (FastAPI + uvicorn).

FastAPI and uvicorn are an optional extra (``pip install matformer[serve]``): they are imported
only by :mod:`~matformer.serve.app` and :func:`run`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .registry import Servable, build_registry, run_name, with_measured_latency

if TYPE_CHECKING:
    import uvicorn

    from .app import Server

log = logging.getLogger(__name__)

__all__ = ["Servable", "build_registry", "load_server", "run", "uvicorn_server"]


def load_server(checkpoint: str | Path, *, sweep: str | Path | None = None,
                name: str | None = None, measure_latency: bool = True, **server_kw: Any
                ) -> Server:
    """A :class:`~matformer.serve.app.Server` for a language-model checkpoint.

    Args:
        checkpoint: Checkpoint or run directory.
        sweep: A stored Mix'n'Match sweep (``mixnmatch.json`` or its directory): its
            Pareto-front configs are served too, with its measured latency.
        name: Prefix of the submodel names (default: the run's directory name).
        measure_latency: Time the submodels the sweep gives no latency for (batch 1).
        server_kw: ``max_batch``, ``max_queue``, ``latency_target_ms``, ``api_key``,
            ``context``.
    """
    from ..families import load_checkpoint, model_kind
    from ..submodels.report import load_sweep
    from .app import Server

    if model_kind(checkpoint) != "lm":
        raise ValueError(f"{checkpoint} is not a language model: only LMs can be served")
    model, tokenizer = load_checkpoint(checkpoint)
    model.eval()
    subs = build_registry(model, name or run_name(checkpoint),
                          load_sweep(sweep) if sweep is not None else None)
    if measure_latency:
        subs = with_measured_latency(model, subs)
    return Server(model, tokenizer, subs, **server_kw)


def uvicorn_server(server: Server, host: str = "127.0.0.1", port: int = 8000, *,
                   log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for the app (``.run()`` blocks; ``.should_exit = True`` stops it
    gracefully: running requests finish first)."""
    import uvicorn

    from .app import create_app

    config = uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level,
                            lifespan="on", timeout_keep_alive=5)
    return uvicorn.Server(config)


def run(server: Server, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve until SIGINT/SIGTERM, then finish in-flight requests and return."""
    uvicorn_server(server, host, port, log_level="info").run()
