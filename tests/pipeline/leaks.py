"""Reference-leak measurement shared by the C extensions' leak tests."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any


def traced_growth(fn: Callable[[], Any], times: int = 1, collect: bool = False) -> int:
    """Bytes of traced memory still held after calling ``fn`` ``times`` times (warm it up first);
    ``collect``: a full garbage collection before and after, so only what reference counting keeps
    is counted."""
    if collect:
        gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(times):
            fn()
        if collect:
            gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
