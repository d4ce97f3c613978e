"""Shared plumbing for the public dispatchers: lazy import of the Triton layer.

The Triton modules are imported only when a call resolves to ``Backend.TRITON`` so that
``import triton_kernels`` never imports ``triton`` (whose interpreter switch must be set first).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from triton_kernels.backend import KernelUnavailableError

__all__ = ["triton_module"]


def triton_module(op: str) -> ModuleType:
    """``triton_kernels._triton.<op>``, or :class:`KernelUnavailableError` if it cannot load."""
    try:
        return importlib.import_module(f"triton_kernels._triton.{op}")
    except ImportError as exc:
        raise KernelUnavailableError(
            f"{op}: the Triton implementation could not be imported ({exc}); use Backend.TORCH"
        ) from exc
