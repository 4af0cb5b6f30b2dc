"""Shared test setup: flush fp32 denormals (150x slower matmuls otherwise), one thread, and a
private token cache."""

from __future__ import annotations

import os
import tempfile

import torch

torch.set_flush_denormal(True)
# Tiny test models gain nothing from threads, and a busy 2-core machine loses a lot to them.
torch.set_num_threads(1)
# Token caches of every test (module-scoped fixtures and subprocesses included) go to a private
# temporary folder, never to ~/.cache.
os.environ["MATFORMER_CACHE"] = tempfile.mkdtemp(prefix="matformer-test-cache-")
