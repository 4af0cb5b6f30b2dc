"""torch.distributed plumbing: process groups, DDP / FSDP2 wrapping, full state dicts.

Training code stays the same on one process and on many: ``setup()`` reads the environment
``torchrun`` sets, ``wrap()`` applies DDP or FSDP2 (``fully_shard`` per block, then the root),
and the state-dict helpers turn sharded or replicated weights and optimizer state into one
consolidated form that a single-process user can load, and that resumes on any world size.

Nesting and sharding combine naturally: FSDP2 gathers a block's full parameters before that
block's forward, so the FFN slices ``weight[:w]`` are taken on the unsharded tensors.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

log = logging.getLogger(__name__)

PARALLEL = ("none", "ddp", "fsdp")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistEnv:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1).

    CUDA ranks use NCCL and one GPU per local rank; CPU ranks use gloo.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r}: choose 'auto', 'cpu' or 'cuda'")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        log.info("rank %d/%d on %s", rank, world, dev)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[DistEnv]:
    """:func:`setup` on entry and :func:`teardown` on exit, errors included, so a failing rank
    leaves the process group instead of hanging the others."""
    env = setup(device)
    try:
        yield env
        # Leave together: a rank that tears its group down while another still writes the
        # last checkpoint can hang at exit (seen with gloo on CPU). Not on errors: a failed
        # rank must not wait for the others.
        barrier()
    finally:
        teardown()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def wrap(model: nn.Module, parallel: str, env: DistEnv, precision: str = "fp32") -> nn.Module:
    """Wrap a model for data-parallel training.

    Args:
        model: A MatFormer model (LM or ViT) with a ``blocks`` ModuleList, already on its device.
        parallel: ``none``, ``ddp`` or ``fsdp`` (FSDP2: shard each block, then the root).
        env: This process's place.
        precision: With ``bf16`` on CUDA, FSDP2 computes in bf16 and reduces gradients in fp32;
            on CPU, bf16 comes from autocast instead.
    """
    if parallel not in PARALLEL:
        raise ValueError(f"parallel={parallel!r}: choose one of {PARALLEL}")
    if parallel == "none" or not env.distributed:
        return model
    if parallel == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if precision == "bf16" and env.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module that owns ``config`` (DDP keeps it in ``.module``; FSDP2 shards in place)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of a backward pass unless ``enabled``.

    Used so a step with several backward passes (granularities of joint mode, micro-batches)
    synchronises gradients once, on its last backward.
    """
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def reshard(model: nn.Module) -> None:
    """Free FSDP2's gathered parameters after a forward without backward (evaluation).

    The root module keeps its parameters unsharded after forward, expecting a backward; after
    a no-grad evaluation nothing would reshard them, and the optimizer would no longer find its
    (sharded) parameters on the module.
    """
    for module in model.modules():
        if hasattr(module, "reshard") and hasattr(module, "set_requires_gradient_sync"):
            module.reshard()


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of the weights (a collective: call it on every rank)."""
    return get_model_state_dict(unwrap(model), options=_FULL)


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load unsharded weights into a plain, DDP or FSDP2 model (every rank passes ``state``)."""
    set_model_state_dict(unwrap(model), state, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, unsharded: valid for any world size."""
    return get_optimizer_state_dict(unwrap(model), optimizer, options=_FULL)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict[str, Any]) -> None:
    set_optimizer_state_dict(unwrap(model), optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def mean_across_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Average scalar metrics over ranks (for logging the global loss)."""
    if not env.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return {k: float(v) / env.world_size for k, v in zip(keys, t.tolist(), strict=True)}
