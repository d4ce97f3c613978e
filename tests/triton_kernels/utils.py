"""Shared helpers for the kernel tests: tolerances (STYLE R3), shapes (R4), Triton guard (R6)."""

from __future__ import annotations

import os

import torch

from triton_kernels.backend import Backend, last_resolved

# atol(dtype) of the three-way rule, relative to max(1, max|ref|) so long sums keep one scale.
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_verbose_allclose(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                            name: str = "tensor", max_print: int = 5) -> None:
    """Liger-style allclose: reports mismatch count, NaN/Inf disagreements and first offenders."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    nan_mismatch = torch.isnan(a) != torch.isnan(e)
    inf_mismatch = (torch.isinf(a) | torch.isinf(e)) & ~(a == e)
    diff = (a - e).abs().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    bad = (diff > atol + rtol * e.abs().nan_to_num(0.0)) | nan_mismatch | inf_mismatch
    if bad.any():
        idx = bad.nonzero()[:max_print].tolist()
        lines = [f"  at {tuple(i)}: got {a[tuple(i)].item():.8g}, expected {e[tuple(i)].item():.8g}"
                 for i in idx]
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol:.3g}, rtol={rtol:.3g}, "
            f"max |diff|={diff.max().item():.3g}, NaN mismatches={int(nan_mismatch.sum())}, "
            f"Inf mismatches={int(inf_mismatch.sum())}); first offenders:\n" + "\n".join(lines))


def assert_three_way(kernel: torch.Tensor, ref_fp32: torch.Tensor, ref_low: torch.Tensor, dtype: torch.dtype,
                     name: str) -> None:
    """FA's rule: max|kernel − ref_fp32| ≤ 2·max|ref_low − ref_fp32| + atol(dtype)·max(1, max|ref_fp32|)."""
    scale = max(1.0, ref_fp32.detach().abs().max().item()) if ref_fp32.numel() else 1.0
    low_err = (ref_low.detach().double() - ref_fp32.detach().double()).abs()
    slack = 2 * (low_err.max().item() if low_err.numel() else 0.0)
    assert_verbose_allclose(kernel, ref_fp32, atol=slack + ATOL[dtype] * scale, name=name)


def assert_triton_ran(op: str) -> None:
    """STYLE R6: fail when the last call of ``op`` did not really resolve to Triton."""
    got = last_resolved(op)
    if os.environ.get("REQUIRE_TRITON") == "1":
        assert got is Backend.TRITON, f"{op}: expected the Triton path, dispatcher resolved to {got}"


def jagged_lengths(num_rows: int, max_len: int, gen: torch.Generator) -> torch.Tensor:
    """Per-row history lengths that include 0 and ``max_len`` whenever there are ≥ 2 rows (GR helper)."""
    lengths = torch.randint(0, max_len + 1, (num_rows,), generator=gen)
    if num_rows >= 2:
        lengths[0] = 0
        lengths[-1] = max_len
    elif num_rows == 1:
        lengths[0] = max_len
    return lengths


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(U, L) bool, True on the first ``lengths[u]`` positions (most recent first, padded at the end)."""
    return torch.arange(max_len).view(1, -1) < lengths.view(-1, 1)


def quantized(*shape: int, gen: torch.Generator, scale: int = 8, spread: int = 8) -> torch.Tensor:
    """fp32 values in {-spread..spread}/scale: sums of products are exact in fp32 in any order.

    Integer outputs (hash codes, top-K indices) are compared with ``torch.equal``; with these
    inputs the kernel's and the reference's fp32 dot products are identical whatever their
    summation order, so equality tests the kernels, not rounding luck.
    """
    return torch.randint(-spread, spread + 1, shape, generator=gen).float() / scale


def poison_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Copy of ``x`` (U, L, ...) with NaN at every padded position, to catch padding leakage."""
    m = mask.view(*mask.shape, *([1] * (x.dim() - 2)))
    return torch.where(m, x, torch.full_like(x, float("nan")))


# Parity tests run the kernels compiled on a GPU machine and interpreted on CPU (STYLE R5).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
