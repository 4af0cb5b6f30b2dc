"""The CUDA path: the same invariants on a GPU, bf16 training, cached and speculative decoding.

Skipped where no CUDA device is present (CI); run on a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from matformer.cache import KVCache
from matformer.checkpoint import save_checkpoint
from matformer.data import TokenDataset
from matformer.families import load_checkpoint
from matformer.generate import generate
from matformer.model import MatFormerLM, lm_loss
from matformer.speculative import speculative_generate
from matformer.task import LMTask
from matformer.tokenizer import Tokenizer
from matformer.train import TrainConfig, Trainer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda")


def _model(**kw: object) -> MatFormerLM:
    torch.manual_seed(0)
    return MatFormerLM(tiny_config(**kw)).to(CUDA)


def test_slicing_equals_masking_on_cuda() -> None:
    model = _model()
    idx = torch.randint(0, model.config.vocab_size, (2, 16), device=CUDA)
    w = model.config.ffn_widths("S")
    with torch.no_grad():
        sliced = model(idx, widths="S")
        masked_model = _model()
        masked_model.load_state_dict(model.state_dict())
        for block, k in zip(masked_model.blocks, w, strict=True):
            for lin in (block.ffn.up_proj, block.ffn.gate_proj):
                if lin is not None:
                    lin.weight[k:] = 0
            block.ffn.down_proj.weight[:, k:] = 0
        masked = masked_model(idx)
    torch.testing.assert_close(sliced, masked, rtol=1e-4, atol=1e-4)


def test_bf16_sample_training_learns_on_cuda(tmp_path: Path) -> None:
    model = _model()
    vocab = model.config.vocab_size
    pattern = torch.arange(4000) % 11 % vocab
    data = TokenDataset(pattern.numpy().astype("uint16"), pattern[:600].numpy().astype("uint16"))
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=4,
                      eval_interval=40, eval_batches=2, ckpt_interval=40, precision="bf16",
                      data="pattern")
    trainer = Trainer(model, LMTask(data, Tokenizer.byte_level(), 32), cfg, tmp_path,
                      progress=False)
    final = trainer.fit()
    assert set(final) == set(model.config.names)
    assert all(v < 1.0 for v in final.values()), final  # the period-11 pattern is learnable
    loaded, _ = load_checkpoint(tmp_path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k].cpu()), k


def test_checkpoint_from_cuda_is_bit_exact(tmp_path: Path) -> None:
    model = _model()
    save_checkpoint(tmp_path / "c", model, Tokenizer.byte_level())
    loaded, _ = load_checkpoint(tmp_path / "c", device="cuda")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_decode_matches_full_forward_on_cuda(dtype: torch.dtype) -> None:
    model = _model().to(dtype)
    idx = torch.randint(0, model.config.vocab_size, (2, 24), device=CUDA)
    with torch.no_grad():
        full = model(idx, widths="M").float()
        cache = KVCache.for_model(model, 2, 24)
        steps = [model(idx[:, :8], widths="M", cache=cache, start_pos=0)]
        steps += [model(idx[:, t:t + 1], widths="M", cache=cache, start_pos=t)
                  for t in range(8, 24)]
        cached = torch.cat(steps, 1).float()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(cached, full, rtol=tol, atol=tol)


@pytest.mark.parametrize("shared", [False, True])
def test_greedy_speculative_equals_target_greedy_on_cuda(shared: bool) -> None:
    model = _model()
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), device=CUDA)
    want = generate(model, prompt, 20, temperature=0.0)
    got, stats = speculative_generate(model, prompt, 20, draft="S", shared_cache=shared,
                                      draft_len=4, temperature=0.0)
    assert torch.equal(got.to(want.device), want)
    assert stats.new_tokens == 20


def test_compiled_forward_matches_eager_on_cuda() -> None:
    model = _model()
    idx = torch.randint(0, model.config.vocab_size, (2, 16), device=CUDA)
    compiled = torch.compile(model, dynamic=False)
    with torch.no_grad():
        for widths in ("S", "XL"):
            torch.testing.assert_close(compiled(idx, widths=widths), model(idx, widths=widths),
                                       rtol=1e-3, atol=1e-3)
    loss = lm_loss(compiled(idx, widths="S"), idx)
    loss.backward()
    grad = model.blocks[0].ffn.up_proj.weight.grad
    assert grad is not None and grad[model.config.ffn_widths("S")[0]:].abs().max() == 0
