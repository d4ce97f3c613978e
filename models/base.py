"""The one base class every ranker part derives from: it carries the kernel backend (STYLE R10).

``set_backend`` on any part (usually the whole :class:`~models.ranker.Ranker`) reaches every
:class:`BackendModule` below it, so a test flips a whole model between the torch reference and the
Triton kernels with one call. Parts pass ``backend=self.backend`` to every ``triton_kernels`` op.
"""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from triton_kernels import Backend

__all__ = ["Backend", "BackendModule"]

_M = TypeVar("_M", bound="BackendModule")


class BackendModule(nn.Module):
    """An ``nn.Module`` that knows which ``triton_kernels`` backend its ops run on.

    Args:
        (none) subclasses call ``super().__init__()``; the backend starts as ``Backend.AUTO``
            (Triton on CUDA tensors, the torch reference on CPU tensors).

    Example:
        >>> import torch
        >>> class Twice(BackendModule):
        ...     def forward(self, x):
        ...         return 2 * x
        >>> m = Twice().set_backend("torch")
        >>> m.backend
        <Backend.TORCH: 'torch'>
        >>> assert m(torch.ones(3)).shape == (3,)
    """

    def __init__(self) -> None:
        super().__init__()
        self.backend: Backend = Backend.AUTO

    def set_backend(self: _M, backend: Backend | str) -> _M:
        """Set the backend of this module and of every BackendModule inside it; returns self."""
        resolved = Backend(backend)
        for m in self.modules():
            if isinstance(m, BackendModule):
                m.backend = resolved
        return self
