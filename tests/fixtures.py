"""Shared test fixtures: factories with overridable keyword arguments (STYLE R15)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from pipeline.broker import EmbeddedBroker
from pipeline.state import Behaviors


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """One embedded Tansu broker for the whole session (tests use unique topic/group names)."""
    with EmbeddedBroker() as b:
        yield b


def make_behaviors(n: int, seed: int = 0, start_ts: int = 1_767_225_600_000) -> Behaviors:
    rng = np.random.default_rng(seed)
    return Behaviors(
        item=rng.integers(1, 1 << 62, n, dtype=np.int64),
        category=rng.integers(1, 1 << 40, n, dtype=np.int64),
        action=rng.integers(1, 6, n).astype(np.uint8),
        ts=start_ts + np.arange(n, dtype=np.int64) * 1000,
    )


def event(kind: str = "behavior", user: Any = 1, item: Any = 10, ts: int = 1_767_225_600_000, **kw: Any) -> dict:
    e = {"type": kind, "user_id": user, "item_id": item, "ts": ts}
    if kind == "impression":
        e.setdefault("category_id", 3)
    e.update(kw)
    return e
