"""Sequence stores: one interface (:class:`SequenceStore`), several backends, opened by URI."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from pipeline.exceptions import StoreConfigError
from pipeline.state.base import DEFAULT_LIFELONG_CAP, Behaviors, SequenceStore, StateDelta, empty_behaviors

__all__ = ["Behaviors", "SequenceStore", "StateDelta", "empty_behaviors", "open_store", "SUPPORTED_STORES"]

SUPPORTED_STORES = ("lmdb:///abs/path", "lmdb://./rel/path", "redis://host:port/db", "memory://")


def open_store(uri: str, *, cap: int | None = None, readonly: bool = False) -> SequenceStore:
    """Open a store from a URI: ``lmdb:///path`` (embedded default), ``redis://host:port/db``,
    ``memory://`` (tests). ``?cap=N`` sets the lifelong cap."""
    parsed = urlparse(uri)
    q = parse_qs(parsed.query)
    if cap is None:
        cap = int(q["cap"][0]) if "cap" in q else DEFAULT_LIFELONG_CAP
    if parsed.scheme == "lmdb":
        from pipeline.state.lmdb import LmdbSequenceStore

        path = (parsed.netloc + parsed.path) if parsed.netloc in ("", ".", "..") else parsed.netloc + parsed.path
        if not path:
            raise StoreConfigError(f"lmdb store URI has no path: {uri!r} (use lmdb:///abs/path)")
        return LmdbSequenceStore(path, cap=cap, readonly=readonly)
    if parsed.scheme in ("redis", "rediss"):
        from pipeline.state.redis import RedisSequenceStore

        return RedisSequenceStore(uri.split("?")[0], cap=cap)
    if parsed.scheme == "memory":
        from pipeline.state.memory import MemorySequenceStore

        return MemorySequenceStore(cap=cap)
    raise StoreConfigError(f"unsupported store URI {uri!r}; use one of {', '.join(SUPPORTED_STORES)}")
