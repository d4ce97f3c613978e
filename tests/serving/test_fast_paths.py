"""The scorer's CPU fast paths in ``models.arch.sequence`` equal the ``triton_kernels`` reference ops.

The scorer encodes one user and scores all candidates against that single history row; on CPU the
DARE top-K search takes a shortcut there (a chunked exact top-K). These tests pin it to the
reference op on the same operands, ties and padding included (SDIM's bucket table has no
shortcut: the reference op itself is the fast one-hot product); ``test_scorer.py`` then checks served scores against ``build_batch`` +
``ranker.forward``.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.arch.sequence import DARE_SERVE_CHUNK, DARESequenceArch
from models.config import DAREConfig
from models.features import Batch, FeatureSpec
from triton_kernels import reference


def _dare(length: int, top_k: int = 20) -> DARESequenceArch:
    spec = FeatureSpec(seq_len=max(length, 1), item_buckets=4096, category_buckets=64)
    return DARESequenceArch(32, spec, DAREConfig(top_k=top_k)).eval()


def _inputs(arch: DARESequenceArch, length: int, b: int, dup_items: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hi = 6 if dup_items else 4095
    items = torch.randint(1, hi, (1, length), generator=g)
    cats = torch.randint(1, 4 if dup_items else 63, (1, length), generator=g)
    mask = torch.ones(1, length, dtype=torch.bool)
    batch = Batch(items, cats, items, mask, torch.randint(1, 4095, (b,), generator=g),
                  torch.randint(1, 63, (b,), generator=g), torch.zeros(b, dtype=torch.long))
    hist_emb = torch.randn(1, length, 32, generator=g)
    return arch.encode(hist_emb, batch), torch.randn(b, 32, generator=g), batch


def _reference_output(arch: DARESequenceArch, enc, target, batch) -> torch.Tensor:
    query, values, pos_logits, r_t = arch._search_inputs(enc, target, batch)
    k = min(arch.config.top_k, enc["dare_keys"].shape[1])
    h, _, _ = reference.dare_search(query, enc["dare_keys"], values, enc["long_mask"], batch.user_index,
                                    pos_logits, top_k=k)
    return torch.cat([h, r_t * h], dim=-1)


@pytest.mark.parametrize("length", [10_000, 1000, 20 * DARE_SERVE_CHUNK, 20 * DARE_SERVE_CHUNK + 1, 200, 21, 20])
def test_dare_serving_search_equals_reference(length):
    arch = _dare(length)
    with torch.inference_mode():
        enc, target, batch = _inputs(arch, length, b=150)  # 3 candidate blocks, the last partial
        fast = arch._serve_one_user(enc, target, batch)
        assert fast is not None
        assert torch.equal(fast, _reference_output(arch, enc, target, batch))
        out, aux = arch(enc, target, batch)  # forward takes the fast path in eval on CPU
        assert torch.equal(out, fast) and aux == {}


@pytest.mark.parametrize("length", [3000, 250])
def test_dare_serving_search_keeps_the_tie_rule(length):
    """Repeated (item, category) pairs in the same log-spaced position bucket give exactly equal
    logits; equal logits across chunk boundaries and at the K-th value must resolve as the
    reference does (higher logit first, then the more recent behavior)."""
    arch = _dare(length)
    with torch.no_grad():
        arch.attn_pos.weight.zero_()  # every position logit equal: ties everywhere
    with torch.inference_mode():
        enc, target, batch = _inputs(arch, length, b=32, dup_items=True, seed=3)
        fast = arch._serve_one_user(enc, target, batch)
        assert torch.equal(fast, _reference_output(arch, enc, target, batch))


def test_dare_serving_search_declines_padding_and_short_rows():
    arch = _dare(100)
    with torch.inference_mode():
        enc, target, batch = _inputs(arch, 100, b=8)
        enc["long_mask"] = enc["long_mask"].clone()
        enc["long_mask"][0, 90:] = False  # padding: the general path handles it
        assert arch._serve_one_user(enc, target, batch) is None
        out, _ = arch(enc, target, batch)
        torch.testing.assert_close(out, _reference_output(arch, enc, target, batch))
    assert math.isfinite(float(out.sum()))


def test_dare_position_memo_follows_weight_updates_and_grad_modes():
    arch = _dare(500)
    with torch.inference_mode():
        enc, target, batch = _inputs(arch, 500, b=8)
        first = arch(enc, target, batch)[0]
    with torch.no_grad():
        arch.attn_pos.weight.mul_(3.0)  # an in-place update (optimizer step, load_state_dict)
    with torch.inference_mode():
        updated = arch(enc, target, batch)[0]
        assert torch.equal(updated, _reference_output(arch, enc, target, batch))
    assert not torch.equal(first, updated)
    enc2, target2, batch2 = _inputs(arch, 500, b=8)  # grad mode, eval: no inference tensors reused
    out = arch(enc2, target2.requires_grad_(), batch2)[0]
    out.sum().backward()
    assert target2.grad is not None
