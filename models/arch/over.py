"""The MLP head: concatenated features → one logit (STYLE R10 ``OverArch``)."""

from __future__ import annotations

import torch
from torch import nn

from models.arch.layers import MLP, BatchNorm
from models.base import BackendModule
from models.config import OverConfig

__all__ = ["OverArch"]


class OverArch(BackendModule):
    """MLP on ``concat[target, short interest, long-sequence features]`` → logit (no sigmoid).

    DIN's head (papers.md §1(a)): hidden 200 × 80 with Dice by default, then ``Linear(·, 1)``.
    With ``config.input_norm`` the input is batch-normalised first, as in the DIN, DARE and
    DiffuMIN codes: the concatenated features live on very different scales (an un-normalised DIN
    sum, SDIM's averaged unit vectors, DiffuMIN's relevance-weighted means).

    Args:
        in_dim (int): width of the concatenated features.
        config (OverConfig): hidden widths and activation.

    Example:
        >>> head = OverArch(12, OverConfig(hidden=(8,), activation="prelu"))
        >>> assert head(torch.randn(5, 12)).shape == (5,)
    """

    def __init__(self, in_dim: int, config: OverConfig) -> None:
        super().__init__()
        self.norm = BatchNorm(in_dim) if config.input_norm else None
        self.mlp = MLP(in_dim, config.hidden, config.activation)
        self.out = nn.Linear(self.mlp.out_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            features = self.norm(features)
        return self.out(self.mlp(features)).squeeze(-1)  # (B,)
