"""Shared launch helpers (STYLE R7): block-size/num_warps choice and launcher-side checks."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

__all__ = [
    "LaunchConfig",
    "MAX_FUSED_SIZE",
    "assert_contiguous",
    "assert_shape",
    "calculate_settings",
    "config_overrides",
    "group_by_user",
    "interpreting",
    "num_sms",
    "pow2_at_least",
]

MAX_FUSED_SIZE = 65536  # largest feature width one program handles in a single tile (Liger's limit)


@dataclass(frozen=True)
class LaunchConfig:
    """Decisions a launcher made, kept on ``ctx`` so backward reuses them (Liger ``_softmax_forward``)."""

    block_size: int  # the main tile width (feature dim or sequence tile)
    num_warps: int
    grid: tuple[int, ...]
    extra: tuple[tuple[str, int], ...] = ()  # other constexpr choices, e.g. (("BLOCK_L", 64),)

    def get(self, name: str) -> int:
        return dict(self.extra)[name]


def interpreting() -> bool:
    """True when Triton runs under its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def config_overrides(env_var: str, defaults: dict[str, int]) -> dict[str, int]:
    """``defaults`` updated from ``env_var`` (``"NAME=int,NAME=int"``), for sweeps on a GPU.

    Every launcher reads its tunables through this, so ``benchmarks/kernels/sweep.py`` can time
    configurations in one process without code edits. Unchanged under the interpreter or when the
    variable is unset. A name not in ``defaults`` or a non-integer value raises ``ValueError``
    naming the variable, so a typo never silently times the default.
    """
    spec = os.environ.get(env_var, "").strip()
    if not spec or interpreting():
        return defaults
    out = dict(defaults)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in out:
            raise ValueError(f"{env_var}: bad entry {item!r}; known names: {sorted(out)}")
        try:
            out[key] = int(value)
        except ValueError:
            raise ValueError(f"{env_var}: {key} must be an integer, got {value.strip()!r}") from None
    return out


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device`` (cached); 4 off CUDA, so the interpreter's launch plans still
    split work the way a GPU's would and the tests cover the split paths."""
    if device.type != "cuda":
        return 4
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def group_by_user(user_index: torch.Tensor, num_users: int, block_b: int, num_blocks: int,
                  min_count: int = 1) -> tuple[torch.Tensor, ...]:
    """Candidate rows sorted by user and cut into blocks of at most ``block_b`` candidates of one user.

    Returns ``counts (U,)`` candidates per user, ``order (B,)`` the rows sorted by user (stable),
    and per grid row ``(num_blocks,)``: ``owner`` the block's user, ``first`` its first slot in
    ``order`` and ``size`` its number of candidates. Only users with at least ``min_count``
    candidates get blocks (``ceil(count / block_b)`` each); ``num_blocks`` is the caller's bound on
    their number, and rows past the last block have ``size = 0``. Device-side ops only: counting
    uses ``scatter_add`` because ``torch.bincount`` on CUDA reads the maximum back to the host.
    Used by dare_search's forward and target_attention's backward.
    """
    ones = torch.ones_like(user_index)
    counts = torch.zeros(num_users, dtype=ones.dtype, device=ones.device).scatter_add_(0, user_index, ones)
    order = torch.argsort(user_index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    per_user = torch.where(counts >= min_count, (counts + block_b - 1) // block_b, 0)
    ends = torch.cumsum(per_user, 0)
    j = torch.arange(num_blocks, device=user_index.device)
    owner = torch.searchsorted(ends, j, right=True).clamp_max(num_users - 1)
    index = j - (ends[owner] - per_user[owner])  # block number within its user
    size = (counts[owner] - index * block_b).clamp(0, block_b) * (j < ends[-1])
    return counts, order, owner, starts[owner] + index * block_b, size


def pow2_at_least(n: int, minimum: int = 1) -> int:
    """Smallest power of two ≥ max(n, minimum)."""
    return max(int(triton.next_power_of_2(max(int(n), 1))), minimum)


def calculate_settings(n: int, minimum: int = 16) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for a tile covering ``n`` elements of one row (Liger convention)."""
    block = pow2_at_least(n, minimum)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"feature width {n} exceeds the fused limit {MAX_FUSED_SIZE}")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps


def assert_contiguous(**tensors: torch.Tensor | None) -> None:
    """Every given tensor is contiguous with a stride-1 last dim (FA ``_layer_norm_fwd`` checks)."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
        if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a stride-1 last dim")


def assert_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
