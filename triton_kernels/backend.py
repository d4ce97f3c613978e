"""Backend selection for the kernel dispatchers (STYLE R1, R6).

``Backend.AUTO`` resolves to Triton on CUDA tensors and to the torch reference on CPU tensors.
``Backend.TRITON`` on a CPU tensor is only allowed under Triton's interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is imported); otherwise it raises
:class:`KernelUnavailableError`, never falls back silently.

Every dispatch is recorded (:func:`last_resolved`, :func:`resolution_counts`) so a parity test can
assert the Triton path really ran instead of comparing torch with torch.
"""

from __future__ import annotations

import enum
import os
import threading
from collections import Counter

import torch

__all__ = [
    "Backend",
    "KernelUnavailableError",
    "last_resolved",
    "reset_resolution_log",
    "resolution_counts",
    "resolve_backend",
]


class Backend(str, enum.Enum):
    """Which implementation a public op runs."""

    AUTO = "auto"  # TRITON on CUDA tensors, TORCH on CPU tensors
    TORCH = "torch"  # the pure-torch reference in ``triton_kernels.reference``
    TRITON = "triton"  # the Triton kernels (compiled on CUDA, interpreted on CPU)


class KernelUnavailableError(RuntimeError):
    """Raised when the Triton backend is requested but cannot run on the given tensors."""


_LOCK = threading.Lock()
_LAST: dict[str, Backend] = {}
_COUNTS: Counter[tuple[str, Backend]] = Counter()


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton is a hard dependency
        return False
    return True


def resolve_backend(op: str, backend: Backend | str, device: torch.device) -> Backend:
    """Turn ``backend`` into TORCH or TRITON for tensors on ``device`` and record the decision."""
    backend = Backend(backend)
    if backend is Backend.AUTO:
        resolved = Backend.TRITON if device.type == "cuda" else Backend.TORCH
    elif backend is Backend.TRITON:
        # Check the interpreter switch before importing triton: importing it with the switch off
        # would fix the compiled mode for the whole process.
        if device.type != "cuda" and not _interpreter_on():
            raise KernelUnavailableError(
                f"{op}: Backend.TRITON on a {device.type} tensor needs Triton's interpreter; set "
                "TRITON_INTERPRET=1 before `triton` is imported, move the tensors to CUDA, or use "
                "Backend.TORCH / Backend.AUTO"
            )
        if not _triton_importable():  # pragma: no cover
            raise KernelUnavailableError(f"{op}: triton is not installed; `pip install triton` or use "
                                         "Backend.TORCH")
        resolved = Backend.TRITON
    else:
        resolved = Backend.TORCH
    with _LOCK:
        _LAST[op] = resolved
        _COUNTS[(op, resolved)] += 1
    return resolved


def last_resolved(op: str) -> Backend | None:
    """The backend the last call of ``op`` actually ran (None if never called)."""
    with _LOCK:
        return _LAST.get(op)


def resolution_counts() -> dict[tuple[str, Backend], int]:
    """How many times each (op, resolved backend) ran since the last reset."""
    with _LOCK:
        return dict(_COUNTS)


def reset_resolution_log() -> None:
    """Forget all recorded resolutions (tests call this before a parity check)."""
    with _LOCK:
        _LAST.clear()
        _COUNTS.clear()
