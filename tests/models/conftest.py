"""Factories for model tests: tiny specs, random store reads and batches."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch

from models import Batch, FeatureSpec, build_batch
from pipeline.state.base import Behaviors


def make_history(rng: np.random.Generator, n: int, items: int = 200, cats: int = 20) -> Behaviors:
    item = rng.integers(1, items, n)
    return Behaviors(item, item % cats, rng.integers(1, 6, n).astype(np.uint8), np.arange(n, dtype=np.int64))


@pytest.fixture
def spec() -> FeatureSpec:
    return FeatureSpec(seq_len=64, item_buckets=257, category_buckets=23)  # primes: no aliasing patterns


@pytest.fixture
def make_batch(spec: FeatureSpec) -> Callable[..., Batch]:
    """make_batch(lengths=(...), seed=0, candidates=None): U == B training layout by default;
    ``candidates=n`` gives the serving layout (U = len(lengths), n candidates of user 0)."""

    def factory(lengths: Sequence[int] = (0, 1, 7, 64, 30), seed: int = 0, candidates: int | None = None,
                batch_spec: FeatureSpec | None = None) -> Batch:
        rng = np.random.default_rng(seed)
        s = batch_spec or spec
        hs = [make_history(rng, n) for n in lengths]
        b = len(lengths) if candidates is None else candidates
        ci = rng.integers(1, 200, b)
        uidx = None if candidates is None else np.zeros(b, dtype=np.int64)
        return build_batch(hs, ci, ci % 20, s, user_index=uidx)

    return factory


def pad_batch(batch: Batch, extra: int, seed: int = 1) -> Batch:
    """The same batch with ``extra`` more padded columns holding random (masked) ids; the padded
    slots already there are filled with random ids too."""
    g = torch.Generator().manual_seed(seed)
    u, length = batch.hist_item.shape

    def widen(x: torch.Tensor) -> torch.Tensor:
        noise = torch.randint(1, 19, (u, length + extra), generator=g)
        wide = torch.cat([x, torch.zeros(u, extra, dtype=x.dtype)], dim=1)
        mask = torch.cat([batch.hist_mask, torch.zeros(u, extra, dtype=torch.bool)], dim=1)
        return torch.where(mask, wide, noise)

    return Batch(widen(batch.hist_item), widen(batch.hist_cat), widen(batch.hist_action),
                 torch.cat([batch.hist_mask, torch.zeros(u, extra, dtype=torch.bool)], dim=1),
                 batch.cand_item, batch.cand_cat, batch.user_index)
