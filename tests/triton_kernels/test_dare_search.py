"""dare_search: Triton vs reference, forward and backward, plus the documented conventions.

``top_idx`` must match exactly. To make that a test of the kernel rather than of rounding luck,
parity inputs are multiples of 1/8 (``quantized``): the fp32 logits are then exact in any
summation order, so both sides see identical logits — and many exact ties, which exercises the
tie rule (smaller position first). ``d keys``, ``d values`` and ``d pos_logits`` are scattered
with ``atomic_add`` (candidates of one user select the same behaviors), whose order is not fixed
on a GPU, so they are compared with the three-way tolerance of STYLE R3, never bit-exactly.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.triton_kernels.utils import (
    DEVICE,
    assert_three_way,
    assert_triton_ran,
    jagged_lengths,
    length_mask,
    poison_padding,
    quantized,
)
from triton_kernels import Backend, dare_search
from triton_kernels.reference import dare_search as dare_search_ref

BACKENDS = [Backend.TORCH, pytest.param(Backend.TRITON, marks=pytest.mark.interpret)]
SHAPES = [  # (B, U, L, da, dr, K, with_pos)
    (1, 1, 1, 16, 16, 1, True),  # single row, single behavior
    (7, 1, 17, 5, 9, 4, True),  # serving layout (U=1), L just above BLOCK_L=16, odd widths, prime B
    (13, 13, 33, 20, 3, 5, False),  # training layout (U == B, prime), three L tiles, no position term
    (5, 3, 40, 7, 12, 16, True),  # K_PAD = BLOCK_L = 16: a whole tile can enter the running set
    (3, 3, 21, 6, 6, 21, True),  # K == L (jagged rows: empty slots get index -1)
    (2, 2, 70, 4, 5, 3, True),  # many tiles, most skipped by the running-threshold test
    (40, 2, 75, 9, 7, 6, True),  # ~20 shuffled candidates per user: several blocks per user, 3 L slices
    (6, 9, 50, 5, 5, 4, False),  # more users than candidates: users without candidates, empty blocks
]


def _inputs(b, u, length, da, dr, with_pos, gen, dtype=torch.float32):
    lengths = jagged_lengths(u, length, gen)
    mask = length_mask(lengths, length)
    q = quantized(b, da, gen=gen)
    k = quantized(u, length, da, gen=gen)
    v = torch.randn(u, length, dr, generator=gen)
    pos = quantized(length, gen=gen) if with_pos else None
    users = torch.arange(b) if b == u else torch.randint(0, u, (b,), generator=gen)
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), mask.to(DEVICE), users.to(DEVICE), cast(pos)


def _run(backend, q, k, v, mask, users, pos, top_k, upcast=False):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (q, k, v, pos)]
    out, idx, w = dare_search(leaves[0], leaves[1], leaves[2], mask, users, leaves[3], top_k=top_k,
                              upcast=upcast, backend=backend)
    weight = torch.linspace(-1, 2, out.numel(), device=out.device).view_as(out)
    (out.float() * weight).sum().backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return out.detach(), idx, w, grads


def _check(q, k, v, mask, users, pos, top_k, dtype):
    got = _run(Backend.TRITON, q, k, v, mask, users, pos, top_k)
    assert_triton_ran("dare_search")
    ref32 = _run(Backend.TORCH, q, k, v, mask, users, pos, top_k, upcast=True)
    low = _run(Backend.TORCH, q, k, v, mask, users, pos, top_k)
    assert got[1].dtype == torch.int64 and torch.equal(got[1], ref32[1])
    assert_three_way(got[0], ref32[0], low[0], dtype, "out")
    assert_three_way(got[2], ref32[2], low[2], dtype, "top_weights")
    for name, g, r, lo in zip(("d query", "d keys", "d values", "d pos"), got[3], ref32[3], low[3]):
        if r is not None:
            assert_three_way(g, r, lo, dtype, name)


@pytest.mark.interpret
@pytest.mark.parametrize("b,u,length,da,dr,top_k,with_pos", SHAPES)
def test_dare_search_parity(b, u, length, da, dr, top_k, with_pos, gen) -> None:
    _check(*_inputs(b, u, length, da, dr, with_pos, gen), top_k, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_rows_and_ties(backend) -> None:
    """Fewer than K real behaviors → index -1 and weight 0; equal logits → smaller position first."""
    keys = torch.ones(2, 6, 2, device=DEVICE)  # every logit equal to 1 for q = (1, 0)
    mask = torch.tensor([[True, True, True, False, False, False], [False] * 6], device=DEVICE)
    values = torch.arange(12.0, device=DEVICE).view(2, 6, 1)
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]], device=DEVICE)
    out, idx, w = dare_search(q, keys, values, mask, torch.tensor([0, 1], device=DEVICE), None, top_k=4,
                              backend=backend)
    assert idx.tolist() == [[0, 1, 2, -1], [-1, -1, -1, -1]]
    torch.testing.assert_close(w.cpu(), torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0], [0.0] * 4]))
    torch.testing.assert_close(out.cpu(), torch.tensor([[1.0], [0.0]]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_never_leaks(backend, gen) -> None:
    """NaN in padded keys/values/pos changes nothing; padded positions get exactly zero gradient."""
    q, k, v, mask, users, pos = _inputs(5, 3, 20, 6, 4, True, gen)  # L = 20 > BLOCK_L
    clean = _run(backend, q, k, v, mask, users, pos, 4)
    dirty = _run(backend, q, poison_padding(k, mask), poison_padding(v, mask), mask, users, pos, 4)
    assert torch.equal(clean[1], dirty[1])
    torch.testing.assert_close(dirty[0], clean[0])
    for g_clean, g_dirty in zip(clean[3], dirty[3]):
        torch.testing.assert_close(g_dirty, g_clean)
    assert torch.all(dirty[3][1][~mask] == 0) and torch.all(dirty[3][2][~mask] == 0)


def test_top_weights_are_detached(gen) -> None:
    q, k, v, mask, users, pos = _inputs(3, 3, 8, 4, 4, True, gen)
    _, _, w = dare_search_ref(q.requires_grad_(), k, v, mask, users, pos, top_k=3)
    assert not w.requires_grad


@pytest.mark.interpret
@settings(deadline=None, max_examples=6)
@given(b=st.integers(1, 6), u=st.integers(1, 3), length=st.integers(1, 48), da=st.integers(1, 20),
       dr=st.integers(1, 20), k_frac=st.floats(0.0, 1.0), with_pos=st.booleans(), seed=st.integers(0, 2**16))
def test_dare_search_property(b, u, length, da, dr, k_frac, with_pos, seed) -> None:
    top_k = max(1, min(length, round(k_frac * min(length, 20))))
    gen = torch.Generator().manual_seed(seed)
    _check(*_inputs(b, u, length, da, dr, with_pos, gen), top_k, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,u,length", [(1024, 1, 100_003), (257, 257, 2048)])  # serving / training
def test_dare_search_gpu(dtype, b, u, length) -> None:
    gen = torch.Generator().manual_seed(11)
    _check(*_inputs(b, u, length, 64, 128, True, gen, dtype), 20, dtype)  # DARE's K = 20


def test_config_env_override(monkeypatch) -> None:
    """``CTRSTREAM_DARE_CONFIG`` sets the launch choices on a GPU; typos fail; the interpreter ignores it."""
    pytest.importorskip("triton")
    from triton_kernels._triton import dare_search as mod

    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base = mod._config(100_000, 64, 64, 20, 1024, 1, cpu)
    assert (base.get("BLOCK_B"), base.block_size, base.get("TF32X3")) == (64, 128, 1)
    assert mod._config(10_000, 64, 64, 20, 256, 256, cpu).block_size == 256  # one candidate per user
    monkeypatch.setenv(mod.CONFIG_ENV, "BLOCK_B=32, TF32X3=0,SPLIT_LEN=4096")
    got = mod._config(100_000, 64, 64, 20, 1024, 1, cpu)
    assert (got.get("BLOCK_B"), got.get("TF32X3"), got.get("SPLIT_LEN"), got.grid) == (32, 0, 4096, (32, 25))
    monkeypatch.setenv(mod.CONFIG_ENV, "BLOCK_BB=32")
    with pytest.raises(ValueError, match=mod.CONFIG_ENV):
        mod._config(100_000, 64, 64, 20, 1024, 1, cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert mod._config(100, 64, 64, 20, 8, 1, cpu).block_size == mod.INTERPRET_BLOCK_L
