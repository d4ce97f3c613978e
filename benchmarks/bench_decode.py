"""The worker's decode (``pipeline.events.decode_batch``), bytes to typed columns with hashed ids,
µs of CPU per event, on two streams:

* ``"stream": "benchmark"``: bench_worker.py's stream (2,000 users, ~10k items: few distinct ids);
* ``"stream": "high_cardinality"``: ids drawn from 10M users, 1B items, 5,000 categories, as a real
  catalogue gives (almost every id of a batch unseen before).

Per stream, two ways to hash the ids, in the same run (best of ``--reps``, alternating):

* ``"hash": "c"``: as shipped, xxh3 in the C decode loop (pipeline/_fastdecode.c);
* ``"hash": "table"``: the C decode, then the Python-side hash of the ids (``_typed_hashes``: the
  ids through ``np.fromiter``, then a direct-mapped numpy table of 2^18 integer ids, warm, each miss
  re-hashed in Python): what a column with an id over 240 bytes takes, and the table every id went
  through before the C hash. (That code had the C decode hand over int64 copies of integer ids, so
  it skipped the ``np.fromiter``: on the benchmark stream it was cheaper than this line, about
  0.2 µs per event for the three columns' table lookups by cProfile; on the high-cardinality
  stream the misses dominate either way.)

``ratio`` = the table's time over the C hash's. Run: ``.venv/bin/python benchmarks/bench_decode.py``
(under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_worker import emit, machine, make_events  # noqa: E402
from pipeline import events as ev  # noqa: E402
from pipeline.events import RecordBatch, decode_batch, encode_event  # noqa: E402


def high_cardinality(n: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [encode_event({"type": "behavior", "user_id": rng.randrange(10**7), "item_id": rng.randrange(10**9),
                          "category_id": rng.randrange(5000), "action": "view", "ts": 1_767_225_600_000 + i})
            for i in range(n)]


def as_batches(values: list[bytes], batch: int) -> list[RecordBatch]:
    return [RecordBatch("events", np.zeros(len(v), np.int64), np.arange(len(v), dtype=np.int64), v, lambda: [])
            for v in (values[i:i + batch] for i in range(0, len(values), batch))]


def timed(batches: list[RecordBatch], hashing: str) -> float:
    """CPU seconds to decode every batch; ``hashing`` "table": the C hashes are discarded and the ids
    hashed by the Python side, as a column the C loop could not hash is."""
    shipped = ev._c_hashes
    if hashing == "table":
        ev._c_hashes = lambda vals, hashes: ev._typed_hashes(vals)
    try:
        t = time.process_time()
        for b in batches:
            decode_batch(b)
        return time.process_time() - t
    finally:
        ev._c_hashes = shipped


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=5_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if ev._fastdecode is None:
        print("pipeline._fastdecode is not built", file=sys.stderr)
        return 1
    streams = {"benchmark": [encode_event(e) for e in make_events(args.events, 2_000)],
               "high_cardinality": high_cardinality(args.events)}
    for name, values in streams.items():
        batches = as_batches(values, args.batch)
        distinct = len(set().union(*(decode_batch(b)[0].item.tolist() for b in batches)))
        timed(batches, "table")  # the table warm, as in a long-running worker
        best = {"c": float("inf"), "table": float("inf")}
        for _ in range(args.reps):
            for h in best:
                best[h] = min(best[h], timed(batches, h))
        n = len(values)
        for h, s in best.items():
            emit({"bench": "decode", "stream": name, "hash": h, "events": n, "batch": args.batch,
                  "distinct_items": distinct, "us_per_event": round(s / n * 1e6, 3),
                  "ratio": round(best["table"] / s, 2),
                  "baseline": "hash: table (the Python-side id hash), same stream, same run", "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
