"""Shared test setup: flush fp32 denormals (150x slower matmuls otherwise), tiny models."""

from __future__ import annotations

import pytest
import torch

torch.set_flush_denormal(True)
# Tiny test models gain nothing from threads, and a busy 2-core machine loses a lot to them.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
                    ) -> None:
    """Token caches of every test go to a per-session temp dir, never to ~/.cache."""
    monkeypatch.setenv("MATFORMER_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))
