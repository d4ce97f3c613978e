"""Amazon reviews + metadata (McAuley et al. 2014 and 2018 dumps) as events.

A review is an interaction of (reviewer, product) at ``unixReviewTime``; every review is a target
(impression + popularity-sampled negatives + click), as in the DIN paper's Amazon protocol where
each next reviewed item is predicted. The shared protocol is in :mod:`pipeline.datasets.taobao`.

Files (plain or ``.gz``, one JSON object per line):

- reviews: ``reviewerID``, ``asin``, ``unixReviewTime`` (2014 ``reviews_<Cat>[_5].json``, 2018
  ``<Cat>[_5].json``);
- metadata: ``asin`` and either ``categories`` (2014: a list of category paths; the lines are
  Python literals, not JSON) or ``category`` (2018: one path). The category of a product is the
  **leaf of its last path** (the DIN preprocessing), 2018 ``main_cat`` when there is no path,
  ``none`` without metadata.

Reviews are streamed and put in time order by the bounded-memory external sort; the metadata map
(asin → category) is the only thing held per product. Reviews dated before 2000-01-01 (a tiny
share of the oldest categories) are dropped: the event contract rejects such timestamps.
"""

from __future__ import annotations

import ast
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.datasets.taobao import Interaction, ProtocolConfig, interactions_to_events, time_sorted
from pipeline.events import MAX_TS_MS, MIN_TS_MS

__all__ = ["iter_events", "load_categories", "read_reviews"]

_WEEK_MS = 7 * 86_400_000


def _open(path: str | Path) -> IO[str]:
    p = str(path)
    return gzip.open(p, "rt", encoding="utf-8") if p.endswith(".gz") else open(p, encoding="utf-8")


def _parse(line: str) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        try:
            obj = ast.literal_eval(line)  # the 2014 metadata dump is Python literals
        except (ValueError, SyntaxError):
            return None
    return obj if isinstance(obj, dict) else None


def _category(meta: dict[str, Any]) -> str:
    paths = meta.get("categories")
    if isinstance(paths, list) and paths and isinstance(paths[-1], list) and paths[-1]:
        return str(paths[-1][-1])
    path = meta.get("category")
    if isinstance(path, list) and path:
        return str(path[-1])
    main = meta.get("main_cat")
    return str(main) if main else "none"


def load_categories(meta_path: str | Path) -> dict[str, str]:
    """asin → category from a metadata file (malformed lines are skipped)."""
    out: dict[str, str] = {}
    with _open(meta_path) as f:
        for line in f:
            obj = _parse(line)
            if obj and "asin" in obj:
                out[str(obj["asin"])] = _category(obj)
    return out


def read_reviews(reviews_path: str | Path, categories: dict[str, str], limit: int | None = None
                 ) -> Iterator[Interaction]:
    """Reviews as interactions, in file order (every review is a target)."""
    n = 0
    with _open(reviews_path) as f:
        for line in f:
            if limit is not None and n >= limit:
                return
            obj = _parse(line)
            if not obj or "reviewerID" not in obj or "asin" not in obj or "unixReviewTime" not in obj:
                continue
            try:
                ts = int(obj["unixReviewTime"]) * 1000
            except (TypeError, ValueError):
                continue
            if not MIN_TS_MS <= ts < MAX_TS_MS:
                continue
            n += 1
            asin = str(obj["asin"])
            yield ts, str(obj["reviewerID"]), asin, categories.get(asin, "none"), "view", True


def iter_events(reviews: str | Path | None = None, meta: str | Path | None = None, *, path: str | Path | None = None,
                negatives: int = 2, target_rate: float = 1.0, seed: int = 7, limit: int | None = None,
                max_buffered: int = 500_000, **protocol: Any) -> Iterator[dict[str, Any]]:
    """Amazon events in time order. ``reviews`` (or ``path``) is the review file, ``meta`` the
    optional metadata file; ``protocol`` passes further :class:`ProtocolConfig` fields."""
    src = reviews or path
    if src is None:
        raise FileNotFoundError("give the Amazon review file: reviews=PATH (and meta=PATH for categories)")
    categories = load_categories(meta) if meta else {}
    cfg = ProtocolConfig(negatives=negatives, target_rate=target_rate, seed=seed, **protocol)
    rows = time_sorted(read_reviews(src, categories, limit), bucket_ms=_WEEK_MS, max_buffered=max_buffered)
    yield from interactions_to_events(rows, cfg)
