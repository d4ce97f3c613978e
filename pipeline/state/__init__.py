"""Sequence stores: one interface (:class:`SequenceStore`), several backends, opened by URI."""

from __future__ import annotations

from urllib.parse import parse_qs, urlparse

from pipeline.exceptions import StoreConfigError
from pipeline.state.base import (
    DEFAULT_LIFELONG_CAP,
    Behaviors,
    GroupedAppends,
    SequenceStore,
    StateDelta,
    empty_behaviors,
)

__all__ = ["Behaviors", "GroupedAppends", "SequenceStore", "StateDelta", "empty_behaviors", "open_store", "SUPPORTED_STORES"]

SUPPORTED_STORES = ("lmdb:///abs/path", "lmdb://./rel/path", "redis://host:port/db", "memory://")


def open_store(uri: str, *, cap: int | None = None, readonly: bool = False) -> SequenceStore:
    """Open a store from a URI: ``lmdb:///path`` (embedded default), ``redis://host:port/db``,
    ``memory://`` (tests). ``?cap=N`` sets the lifelong cap; Redis also takes ``?namespace=NAME``
    (key prefix) and ``?single_slot=1`` (Redis Cluster; see ``pipeline.state.redis``)."""
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

        unknown = set(q) - {"cap", "namespace", "single_slot"}
        if unknown:
            raise StoreConfigError(f"unknown redis store option(s) {sorted(unknown)} in {uri!r} "
                                   "(known: cap, namespace, single_slot)")
        return RedisSequenceStore(uri.split("?")[0], cap=cap, namespace=q.get("namespace", ["ctrstream"])[0],
                                  single_slot=q.get("single_slot", ["0"])[0].lower() in ("1", "true", "yes"),
                                  readonly=readonly)
    if parsed.scheme == "memory":
        from pipeline.state.memory import MemorySequenceStore

        return MemorySequenceStore(cap=cap)
    raise StoreConfigError(f"unsupported store URI {uri!r}; use one of {', '.join(SUPPORTED_STORES)}")
