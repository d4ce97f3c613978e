"""Small shape/dtype helpers shared by the reference ops (pure torch)."""

from __future__ import annotations

import torch

__all__ = ["compute_dtype", "check", "gather_user_rows"]


def compute_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    """fp32 when ``upcast`` (accuracy oracle), else the input's own floating dtype."""
    return torch.float32 if upcast else x.dtype


def check(cond: bool, msg: str) -> None:
    """Raise ``ValueError(msg)`` unless ``cond`` (shape checks that survive ``python -O``)."""
    if not cond:
        raise ValueError(msg)


def gather_user_rows(x: torch.Tensor, user_index: torch.Tensor) -> torch.Tensor:
    """``x[user_index]`` for per-user tensors ``(U, ...)``; an expand (no copy) when U == 1."""
    if x.shape[0] == 1:
        return x.expand(user_index.shape[0], *x.shape[1:])
    return x.index_select(0, user_index)
