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

    A part may ask for its features to start switched down: the last ``tail`` inputs start with
    scale ``tail_scale`` (their BatchNorm ``weight``, or without ``input_norm`` a learned
    per-feature scale). DiffuMIN starts its generated interests ``r*`` at 0 this way, so the head
    begins from the extracted interests and learns how much of ``r*`` to use (see
    :class:`DiffuMINArch`). A scale in front of BatchNorm would be normalised away, hence here.

    Args:
        in_dim (int): width of the concatenated features.
        config (OverConfig): hidden widths and activation.
        tail (int, default 0): how many trailing inputs start at ``tail_scale``.
        tail_scale (float, default 1.0): their initial scale.

    Example:
        >>> head = OverArch(12, OverConfig(hidden=(8,), activation="prelu"))
        >>> assert head(torch.randn(5, 12)).shape == (5,)
    """

    def __init__(self, in_dim: int, config: OverConfig, tail: int = 0, tail_scale: float = 1.0) -> None:
        super().__init__()
        if not 0 <= tail <= in_dim:
            raise ValueError(f"tail must be in [0, {in_dim}], got {tail}")
        self.norm = BatchNorm(in_dim) if config.input_norm else None
        self.scale: nn.Parameter | None = None
        if tail and tail_scale != 1.0:
            start = torch.ones(in_dim)
            start[in_dim - tail:] = tail_scale
            if self.norm is not None:
                with torch.no_grad():
                    self.norm.weight.copy_(start)
            else:
                self.scale = nn.Parameter(start)  # (in_dim,)
        self.mlp = MLP(in_dim, config.hidden, config.activation)
        self.out = nn.Linear(self.mlp.out_dim, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            features = self.norm(features)
        elif self.scale is not None:
            features = features * self.scale
        logits: torch.Tensor = self.out(self.mlp(features)).squeeze(-1)  # (B,)
        return logits
