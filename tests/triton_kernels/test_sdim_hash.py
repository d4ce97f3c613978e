"""sdim_hash: Triton vs reference (codes must match exactly) and the SimHash collision law."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.triton_kernels.utils import DEVICE, assert_triton_ran, quantized
from triton_kernels import Backend, sdim_hash
from triton_kernels.reference import sdim_hash as sdim_hash_ref

SHAPES = [
    (1, 1, 16, 1, 1),  # single row, single bit
    (3, 7, 5, 4, 3),  # non-power-of-two d, prime L
    (13, 33, 33, 16, 3),  # prime batch, L just above BLOCK_R=32, d just above 32, paper's G=16/τ=3
    (2, 5, 130, 2, 4),  # d above two BLOCK_D=64 chunks
    (1, 19, 24, 3, 7),  # 21 projection columns: BLOCK_M padding inside groups
    (1, 131, 64, 16, 3),  # serving: L just above the GPU's BLOCK_R=128, d a multiple of BLOCK_D (EVEN_D)
    (2, 9, 20, 5, 6),  # G and τ both non-powers of two: (G_PAD, T_PAD) = (8, 8) padding
    (1, 7, 16, 1, 30),  # τ = 30, the maximum: bit 29 is the top bit of the int32 packing
    (2, 3, 17, 17, 1),  # G = 17 single-bit groups: G_PAD = 32
]


@pytest.mark.interpret
@pytest.mark.parametrize("n,length,d,num_hashes,hash_bits", SHAPES)
def test_sdim_hash_parity(n: int, length: int, d: int, num_hashes: int, hash_bits: int, gen) -> None:
    x = quantized(n, length, d, gen=gen).to(DEVICE)
    proj = quantized(d, num_hashes * hash_bits, gen=gen).to(DEVICE)
    got = sdim_hash(x, proj, num_hashes=num_hashes, hash_bits=hash_bits, backend=Backend.TRITON)
    assert_triton_ran("sdim_hash")
    ref = sdim_hash_ref(x, proj, num_hashes=num_hashes, hash_bits=hash_bits)
    assert got.dtype == torch.int64 and got.shape == (n, length, num_hashes)
    assert torch.equal(got, ref)
    assert int(ref.min()) >= 0 and int(ref.max()) < 2**hash_bits


@pytest.mark.interpret
def test_sdim_hash_candidates_and_dtype_invariance(gen) -> None:
    """Candidates hash as (B, 1, d); fp16 inputs give the fp32 bits (projection is always fp32)."""
    x = quantized(7, 1, 12, gen=gen).to(DEVICE)  # 7 candidates (prime), d = 12
    proj = quantized(12, 8 * 2, gen=gen).to(DEVICE)  # G = 8, τ = 2
    ref = sdim_hash_ref(x, proj, num_hashes=8, hash_bits=2)
    got = sdim_hash(x.half(), proj, num_hashes=8, hash_bits=2, backend=Backend.TRITON)
    assert_triton_ran("sdim_hash")
    assert torch.equal(got, ref)  # quantized values are exact in fp16 too


def test_sdim_hash_bit_layout() -> None:
    """Bit j of group g is column g·τ + j of the projection: code = Σ bit_j << j."""
    proj = torch.zeros(2, 6)  # G = 2, τ = 3
    proj[0, 0] = proj[0, 2] = 1.0  # group 0: bits 0 and 2 → 5
    proj[0, 4] = 1.0  # group 1: bit 1 → 2
    codes = sdim_hash_ref(torch.tensor([[[1.0, 0.0]]]), proj, num_hashes=2, hash_bits=3)
    assert codes.tolist() == [[[5, 2]]]


@pytest.mark.parametrize("theta", [math.pi / 6, math.pi / 3, math.pi / 2, 2 * math.pi / 3])
@pytest.mark.parametrize("tau", [1, 3])
def test_sdim_collision_rate_matches_theory(theta: float, tau: int) -> None:
    """P[all τ bits agree] = (1 − θ/π)^τ for unit vectors at angle θ (papers.md §2(a) 5).

    One pair at angle θ hashed by 8000 independent groups of fresh Gaussian hyperplanes: given
    the pair, the groups' collision events are independent Bernoulli((1 − θ/π)^τ) draws.
    """
    gen = torch.Generator().manual_seed(7)
    d, groups = 24, 8000
    a = torch.randn(d, generator=gen)
    a = a / a.norm()
    r = torch.randn(d, generator=gen)
    r = r - (r @ a) * a
    r = r / r.norm()
    b = math.cos(theta) * a + math.sin(theta) * r  # angle exactly θ to a
    proj = torch.randn(d, groups * tau, generator=gen)
    codes = sdim_hash_ref(torch.stack([a, b]).view(2, 1, d), proj, num_hashes=groups, hash_bits=tau)
    rate = (codes[0, 0] == codes[1, 0]).double().mean().item()
    p = (1 - theta / math.pi) ** tau
    sigma = math.sqrt(p * (1 - p) / groups)
    assert abs(rate - p) <= 4.5 * sigma, (rate, p, sigma)


@pytest.mark.interpret
@settings(deadline=None, max_examples=8)
@given(n=st.integers(1, 5), length=st.integers(1, 40), d=st.integers(1, 40), num_hashes=st.integers(1, 6),
       hash_bits=st.integers(1, 5), half=st.booleans(), seed=st.integers(0, 2**16))
def test_sdim_hash_property(n: int, length: int, d: int, num_hashes: int, hash_bits: int, half: bool,
                            seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = quantized(n, length, d, gen=gen).to(DEVICE)
    proj = quantized(d, num_hashes * hash_bits, gen=gen).to(DEVICE)
    got = sdim_hash(x.half() if half else x, proj, num_hashes=num_hashes, hash_bits=hash_bits,
                    backend=Backend.TRITON)
    assert_triton_ran("sdim_hash")
    assert torch.equal(got, sdim_hash_ref(x, proj, num_hashes=num_hashes, hash_bits=hash_bits))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_sdim_hash_gpu_large(dtype: torch.dtype) -> None:
    """Compiled, long sequences; inputs exact in bf16 so the codes must still match exactly."""
    gen = torch.Generator().manual_seed(3)
    x = quantized(4, 100_003, 64, gen=gen, spread=4).to("cuda", dtype)  # L prime and > 1e5, d = 64
    proj = quantized(64, 48, gen=gen, spread=4).to("cuda")  # paper: m = 48, G = 16, τ = 3
    got = sdim_hash(x, proj, num_hashes=16, hash_bits=3, backend=Backend.TRITON)
    assert_triton_ran("sdim_hash")
    assert torch.equal(got, sdim_hash_ref(x, proj, num_hashes=16, hash_bits=3))


def test_sdim_hash_config_env_override(monkeypatch) -> None:
    """CTRSTREAM_SDIM_*_CONFIG overrides tunables on a GPU (not under the interpreter); typos raise."""
    pytest.importorskip("triton")
    from triton_kernels._triton import sdim_hash as mod

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base = mod.sdim_hash_config(1000, 64, 16, 3)
    monkeypatch.setenv(mod.ENV_CONFIG, "BLOCK_R=64, num_warps=4")
    got = mod.sdim_hash_config(1000, 64, 16, 3)
    assert (got["BLOCK_R"], got["num_warps"]) == (64, 4)
    assert {k: v for k, v in got.items() if k not in ("BLOCK_R", "num_warps")} == {
        k: v for k, v in base.items() if k not in ("BLOCK_R", "num_warps")}
    monkeypatch.setenv(mod.ENV_CONFIG, "BLOCK_ROWS=64")
    with pytest.raises(ValueError, match="BLOCK_ROWS"):
        mod.sdim_hash_config(1000, 64, 16, 3)
