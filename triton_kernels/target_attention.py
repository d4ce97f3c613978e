"""Public ``target_attention`` (STYLE R1): the reference signature plus a trailing ``backend``."""

from __future__ import annotations

from typing import TypedDict

import torch

from triton_kernels import reference
from triton_kernels._dispatch import triton_module
from triton_kernels.backend import Backend, resolve_backend
from triton_kernels.reference.target_attention import Activation

__all__ = ["target_attention"]


class _Options(TypedDict):
    """The keyword arguments shared by the reference op and the Triton launcher."""

    activation: Activation
    alpha: torch.Tensor | None
    dice_mean: torch.Tensor | None
    dice_var: torch.Tensor | None
    dice_eps: float
    softmax: bool
    upcast: bool


def target_attention(
    query: torch.Tensor,  # (B, d)
    keys: torch.Tensor,  # (U, L, d)
    mask: torch.Tensor,  # (U, L) bool
    user_index: torch.Tensor,  # (B,) int64
    w1: torch.Tensor,  # (4d, H)
    b1: torch.Tensor,  # (H,)
    w2: torch.Tensor,  # (H,)
    b2: torch.Tensor,  # (1,)
    *,
    activation: Activation = "sigmoid",
    alpha: torch.Tensor | None = None,  # (H,)
    dice_mean: torch.Tensor | None = None,  # (H,)
    dice_var: torch.Tensor | None = None,  # (H,)
    dice_eps: float = 1e-8,
    softmax: bool = False,
    upcast: bool = False,
    backend: Backend = Backend.AUTO,
) -> torch.Tensor:  # (B, d)
    """Fused DIN activation unit + pooling; see :mod:`triton_kernels.reference.target_attention`."""
    kwargs: _Options = dict(activation=activation, alpha=alpha, dice_mean=dice_mean, dice_var=dice_var,
                            dice_eps=dice_eps, softmax=softmax, upcast=upcast)
    if resolve_backend("target_attention", backend, query.device) is Backend.TRITON:
        out: torch.Tensor = triton_module("target_attention").target_attention_triton(
            query, keys, mask, user_index, w1, b1, w2, b2, **kwargs)
        return out
    return reference.target_attention(query, keys, mask, user_index, w1, b1, w2, b2, **kwargs)
