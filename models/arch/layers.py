"""Shared layers: Dice (DIN's data-adaptive activation), an MLP, and the item embedding."""

from __future__ import annotations

import torch
from torch import nn

from models.features import FeatureSpec

__all__ = ["EMBEDDING_INIT_STD", "MLP", "BatchNorm", "Dice", "ItemEmbedding", "make_activation"]

#: Every embedding table starts as N(0, 0.01²): thuml/DARE initialises all non-bias parameters
#: with N(0, 0.01) (papers.md §3(b)); the padding row 0 is zero and never trained.
EMBEDDING_INIT_STD = 0.01


class _RunningStats(nn.Module):
    """Batch statistics in training (updating running ones), running statistics in eval."""

    running_mean: torch.Tensor  # buffers, registered in __init__
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float, momentum: float) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(num_features))  # (H,)
        self.register_buffer("running_var", torch.ones(num_features))  # (H,)

    def statistics(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                   differentiable: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, var) to normalise with: batch stats of the rows where ``mask`` in training
        (updating the running stats), the running stats in eval or when no row is real."""
        if not self.training:
            return self.running_mean, self.running_var
        rows = x.reshape(-1, x.shape[-1])  # (N, H)
        if mask is not None:
            rows = rows[mask.reshape(-1)]
        n = rows.shape[0]
        if n == 0:
            return self.running_mean, self.running_var
        if not differentiable:
            rows = rows.detach()
        mean = rows.mean(0)  # (H,)
        var = rows.var(0, unbiased=False)  # (H,)
        with torch.no_grad():
            unbiased = var.detach() * (n / (n - 1)) if n > 1 else var.detach()
            self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        return mean, var


class Dice(_RunningStats):
    """DIN's Dice activation: ``p = σ((s − E[s]) / sqrt(Var[s] + ε))``, ``f = p·s + (1 − p)·α·s``.

    Training uses the mini-batch statistics of the (masked) rows and updates running statistics;
    eval uses the running statistics (BatchNorm without affine, papers.md §1(a), pitfall 25). It is
    computed by hand rather than with ``BatchNorm1d`` so a batch of one row works (variance 0).

    Args:
        num_features (int): hidden units H; statistics and α are per unit.
        eps (float, default 1e-8): the paper's ε.
        momentum (float, default 0.1): running-statistics update rate.

    Example:
        >>> dice = Dice(8)
        >>> y = dice(torch.randn(4, 8))
        >>> assert y.shape == (4, 8)
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps, momentum)
        self.alpha = nn.Parameter(torch.zeros(num_features))  # (H,) FuxiCTR/DIN-code init 0

    def activate(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """Dice with given statistics (elementwise)."""
        p = torch.sigmoid((x - mean) * torch.rsqrt(var + self.eps))
        return p * x + (1 - p) * self.alpha * x

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mean, var = self.statistics(x, mask)
        return self.activate(x, mean, var)


class BatchNorm(_RunningStats):
    """BatchNorm over the last dimension (the head-input BN of the DIN, DARE and DiffuMIN codes),
    by hand so a training batch of one row works (it then outputs the bias).

    Args:
        num_features (int): width H.
        eps (float, default 1e-5): variance guard.
        momentum (float, default 0.1): running-statistics update rate.

    Example:
        >>> bn = BatchNorm(6)
        >>> assert bn(torch.randn(5, 6)).shape == (5, 6)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps, momentum)
        self.weight = nn.Parameter(torch.ones(num_features))  # (H,)
        self.bias = nn.Parameter(torch.zeros(num_features))  # (H,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, var = self.statistics(x)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def make_activation(name: str, width: int) -> nn.Module:
    """``dice`` → :class:`Dice`, ``prelu`` → PReLU (DARE's init 0.1), ``sigmoid``, ``relu``."""
    if name == "dice":
        return Dice(width)
    if name == "prelu":
        return nn.PReLU(width, init=0.1)
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}")


class MLP(nn.Module):
    """Stack of ``Linear → activation`` layers (no output layer).

    Args:
        in_dim (int): input width.
        hidden (tuple[int, ...]): widths of the hidden layers; ``out_dim`` is the last one
            (``in_dim`` when empty).
        activation (str, default "dice"): dice, prelu, sigmoid or relu.

    Example:
        >>> mlp = MLP(16, (32, 8), "prelu")
        >>> assert mlp(torch.randn(5, 16)).shape == (5, 8)
    """

    def __init__(self, in_dim: int, hidden: tuple[int, ...], activation: str = "dice") -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), make_activation(activation, h)]
            width = h
        self.layers = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(x)
        return out


class ItemEmbedding(nn.Module):
    """Item + category tables shared by behaviors and candidates (DIN: the same tables embed both).

    An item is ``concat(E_item[item], E_cat[category])``: width ``2 * embed_dim``. Row 0 of each
    table is padding (zero, never trained), matching :func:`models.features.fold_ids`.

    Args:
        features (FeatureSpec): table sizes (``item_buckets``, ``category_buckets``).
        embed_dim (int): width of each of the two tables.

    Example:
        >>> emb = ItemEmbedding(FeatureSpec(item_buckets=100, category_buckets=10), 8)
        >>> out = emb(torch.tensor([[1, 2, 0]]), torch.tensor([[3, 4, 0]]))
        >>> assert out.shape == (1, 3, 16)
    """

    def __init__(self, features: FeatureSpec, embed_dim: int) -> None:
        super().__init__()
        self.item = nn.Embedding(features.item_buckets, embed_dim, padding_idx=0)
        self.category = nn.Embedding(features.category_buckets, embed_dim, padding_idx=0)
        for table in (self.item, self.category):
            nn.init.normal_(table.weight, 0.0, EMBEDDING_INIT_STD)
            with torch.no_grad():
                table.weight[0].zero_()
        self.out_dim = 2 * embed_dim

    def forward(self, item: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.item(item), self.category(category)], dim=-1)  # (..., 2e)
