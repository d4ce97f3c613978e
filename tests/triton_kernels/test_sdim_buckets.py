"""sdim_bucket_sums and sdim_gather: Triton vs reference, forward and backward; SDIM semantics.

``counts`` are integers and must match exactly. Float sums may differ in rounding: the forward
splits long sequences into chunks combined with ``atomic_add``, and the gather backward scatters
into shared buckets with ``atomic_add``, whose summation order is not fixed; those are compared
with the three-way tolerance of STYLE R3, never bit-exactly.
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
)
from triton_kernels import Backend, sdim_bucket_sums, sdim_gather, sdim_hash
from triton_kernels.reference import sdim_bucket_sums as bucket_sums_ref
from triton_kernels.reference import sdim_gather as gather_ref

SHAPES = [  # (U, L, d, G, hash_bits, B)
    (1, 1, 16, 1, 1, 1),  # single user, single behavior, single candidate
    (3, 17, 5, 4, 3, 7),  # L just above BLOCK_L=16, non-power-of-two d, prime B
    (2, 40, 33, 16, 3, 13),  # paper's G=16/τ=3, d just above 32, prime B, several L tiles
    (5, 9, 20, 2, 5, 5),  # 32 codes per group (BLOCK_C > 16)
    (13, 6, 8, 3, 2, 13),  # prime U, training layout (U == B)
    (1, 300, 16, 16, 3, 70),  # serving: L split into chunks (partial tables + reduce), B split too
    (1, 50, 12, 5, 5, 37),  # serving, non-power-of-two G, 32 codes (BLOCK_G padding)
    (2, 40, 8, 3, 8, 5),  # τ = 8: 256 codes, several code blocks per group; gather atomic path
]


def _inputs(u: int, length: int, d: int, g: int, hash_bits: int, b: int, gen: torch.Generator,
            dtype: torch.dtype = torch.float32):
    lengths = jagged_lengths(u, length, gen)
    mask = length_mask(lengths, length)
    emb = torch.randn(u, length, d, generator=gen)
    codes = torch.randint(0, 2**hash_bits, (u, length, g), generator=gen)
    codes = torch.where(mask.unsqueeze(-1), codes, torch.full_like(codes, 999))  # garbage on padding
    cand_codes = torch.randint(0, 2**hash_bits, (b, g), generator=gen)
    user_index = torch.arange(b) % u if b == u else torch.randint(0, u, (b,), generator=gen)
    to = {"device": DEVICE}
    return (emb.to(DEVICE, dtype), codes.to(**to), mask.to(**to), cand_codes.to(**to), user_index.to(**to))


def _run(backend: Backend, emb, codes, mask, cand_codes, user_index, hash_bits, upcast=False):
    x = emb.detach().clone().requires_grad_()
    sums, counts = sdim_bucket_sums(x, codes, mask, hash_bits=hash_bits, upcast=upcast, backend=backend)
    sums.retain_grad()
    out = sdim_gather(sums, counts, cand_codes, user_index, upcast=upcast, backend=backend)
    weight = torch.linspace(-1, 2, out.numel(), device=out.device).view_as(out)
    (out.float() * weight).sum().backward()
    return sums.detach(), counts, out.detach(), x.grad, sums.grad


def _check(emb, codes, mask, cand_codes, user_index, hash_bits, dtype) -> None:
    got = _run(Backend.TRITON, emb, codes, mask, cand_codes, user_index, hash_bits)
    assert_triton_ran("sdim_bucket_sums")
    assert_triton_ran("sdim_gather")
    ref32 = _run(Backend.TORCH, emb, codes, mask, cand_codes, user_index, hash_bits, upcast=True)
    low = _run(Backend.TORCH, emb, codes, mask, cand_codes, user_index, hash_bits)
    assert got[1].dtype == torch.int32 and torch.equal(got[1], ref32[1])
    for name, i in (("sums", 0), ("out", 2), ("d seq_emb", 3), ("d sums", 4)):
        assert_three_way(got[i], ref32[i], low[i], dtype, name)


@pytest.mark.interpret
@pytest.mark.parametrize("u,length,d,g,hash_bits,b", SHAPES)
def test_sdim_buckets_parity(u, length, d, g, hash_bits, b, gen) -> None:
    _check(*_inputs(u, length, d, g, hash_bits, b, gen), hash_bits, torch.float32)


@pytest.mark.interpret
def test_sdim_buckets_serving_layout(gen) -> None:
    """U = 1 user, many candidates sharing buckets (atomic scatter in the gather backward)."""
    emb, codes, mask, cand, _ = _inputs(1, 35, 12, 4, 2, 11, gen)  # L = 35 spans 3 tiles; 11 candidates
    _check(emb, codes, mask, cand, torch.zeros(11, dtype=torch.int64, device=DEVICE), 2, torch.float32)


@pytest.mark.interpret
@pytest.mark.parametrize("fill", [False, True])
def test_sdim_buckets_serving_empty_and_full_mask(fill: bool, gen) -> None:
    """U = 1, L over several chunks: an all-padding history (zero table) and a full one."""
    emb, codes, _, cand, _ = _inputs(1, 133, 16, 6, 3, 40, gen)
    mask = torch.full((1, 133), fill, dtype=torch.bool, device=DEVICE)
    codes = torch.randint(0, 8, codes.shape, generator=gen).to(DEVICE)
    users = torch.zeros(40, dtype=torch.int64, device=DEVICE)
    _check(emb, codes, mask, cand, users, 3, torch.float32)
    if not fill:
        sums, counts = sdim_bucket_sums(emb, codes, mask, hash_bits=3, backend=Backend.TRITON)
        assert torch.all(sums == 0) and torch.all(counts == 0)


def test_reference_padding_never_leaks(gen) -> None:
    """NaN embeddings and garbage codes on padding change neither outputs nor gradients."""
    emb, codes, mask, cand, users = _inputs(4, 12, 6, 3, 3, 5, gen)
    clean = _run(Backend.TORCH, emb, codes, mask, cand, users, 3)
    dirty = _run(Backend.TORCH, poison_padding(emb, mask), codes, mask, cand, users, 3)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)
    assert torch.all(dirty[3][~mask] == 0)


@pytest.mark.interpret
def test_triton_padding_never_leaks(gen) -> None:
    emb, codes, mask, cand, users = _inputs(4, 20, 6, 3, 3, 5, gen)  # L = 20 > BLOCK_L
    clean = _run(Backend.TRITON, emb, codes, mask, cand, users, 3)
    dirty = _run(Backend.TRITON, poison_padding(emb, mask), codes, mask, cand, users, 3)
    assert_triton_ran("sdim_gather")
    assert torch.equal(clean[1], dirty[1])
    for name, a, b in zip(("sums", "counts", "out", "d seq_emb", "d sums"), clean, dirty):
        if a.is_floating_point():
            assert not b.isnan().any(), name
            torch.testing.assert_close(b, a, msg=name)
    assert torch.all(dirty[3][~mask] == 0)


def test_reference_equals_the_definition(gen) -> None:
    """The reference's scatter one-hot product equals the per-behavior sum it stands for."""
    u, length, d, g, bits = 3, 23, 4, 3, 2
    emb, codes, mask, _, _ = _inputs(u, length, d, g, bits, 1, gen)
    sums, counts = bucket_sums_ref(emb, codes, mask, hash_bits=bits)
    want_s = torch.zeros(u, g, 1 << bits, d, dtype=torch.float64)
    want_c = torch.zeros(u, g, 1 << bits, dtype=torch.int32)
    for i in range(u):
        for j in range(length):
            if mask[i, j]:
                for k in range(g):
                    want_s[i, k, codes[i, j, k]] += emb[i, j].double()
                    want_c[i, k, codes[i, j, k]] += 1
    assert torch.equal(counts, want_c)
    torch.testing.assert_close(sums.double(), want_s, rtol=1e-5, atol=1e-5)


def test_reference_counts_exact_in_bf16(gen) -> None:
    """Counts are summed as integers: a bucket holding 1,000 behaviors counts 1,000 in bf16
    (a bf16 running sum of ones stops at 256)."""
    emb = torch.randn(1, 1000, 4, generator=gen).to(torch.bfloat16)
    codes = torch.zeros(1, 1000, 2, dtype=torch.int64)
    _, counts = bucket_sums_ref(emb, codes, torch.ones(1, 1000, dtype=torch.bool), hash_bits=2)
    assert counts[0, :, 0].tolist() == [1000, 1000]


def test_bucket_sums_are_additive(gen) -> None:
    """Serving extends a table incrementally: table(old ++ new) == table(old) + table(new)."""
    emb, codes, mask, _, _ = _inputs(3, 10, 5, 2, 3, 3, gen)
    full_s, full_c = bucket_sums_ref(emb, codes, mask, hash_bits=3)
    old = mask.clone()
    old[:, 4:] = False
    s1, c1 = bucket_sums_ref(emb, codes, old, hash_bits=3)
    s2, c2 = bucket_sums_ref(emb, codes, mask & ~old, hash_bits=3)
    torch.testing.assert_close(s1 + s2, full_s)
    assert torch.equal(c1 + c2, full_c)


def test_gather_is_l2_normalised_collision_mean(gen) -> None:
    """out = mean_g ℓ2norm(Σ of the candidate's collided behaviors); empty collision → 0 (SDIM §2)."""
    d, g, bits, length = 4, 3, 3, 9
    emb = torch.randn(1, length, d, generator=gen)
    proj = torch.randn(d, g * bits, generator=gen)
    mask = torch.ones(1, length, dtype=torch.bool)
    mask[0, 7:] = False
    codes = sdim_hash(emb, proj, num_hashes=g, hash_bits=bits, backend=Backend.TORCH)
    cand = torch.randn(2, 1, d, generator=gen)
    cand_codes = sdim_hash(cand, proj, num_hashes=g, hash_bits=bits, backend=Backend.TORCH)[:, 0]
    present = set(codes[0, :7, 0].tolist())
    # 7 behaviors, 8 codes: some bucket is empty; point candidate 1's group 0 at it
    cand_codes[1, 0] = min(c for c in range(2**bits) if c not in present)
    sums, counts = bucket_sums_ref(emb, codes, mask, hash_bits=bits)
    out = gather_ref(sums, counts, cand_codes, torch.zeros(2, dtype=torch.int64))
    for b in range(2):
        parts = []
        for grp in range(g):
            hit = (codes[0, :, grp] == cand_codes[b, grp]) & mask[0]
            v = emb[0][hit].sum(0)
            parts.append(v / v.norm() if hit.any() else torch.zeros(d))
        torch.testing.assert_close(out[b], torch.stack(parts).mean(0))


@pytest.mark.interpret
@settings(deadline=None, max_examples=6)
@given(u=st.integers(1, 4), length=st.integers(1, 40), d=st.integers(1, 24), g=st.integers(1, 5),
       bits=st.integers(1, 4), b=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_sdim_buckets_property(u, length, d, g, bits, b, seed) -> None:
    _check(*_inputs(u, length, d, g, bits, b, torch.Generator().manual_seed(seed)), bits, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("u,length,b", [(1, 100_003, 512), (64, 2048, 64)])  # serving / training layouts
def test_sdim_buckets_gpu(dtype, u, length, b) -> None:
    gen = torch.Generator().manual_seed(5)
    emb, codes, mask, cand, users = _inputs(u, length, 128, 16, 3, b, gen, dtype)  # paper's d=128, G=16
    _check(emb, codes, mask, cand, users, 3, dtype)
