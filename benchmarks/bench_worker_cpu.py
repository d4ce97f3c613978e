"""The stream worker's own cost per event, without a broker: ``StreamWorker.process`` over the
benchmark stream of bench_worker.py, already in memory as poll batches, into a fresh store, with a
producer that drops what it is given. What is left is the worker's work (decode, validate,
sequence appends, joins, labels, sample JSON, the store commit), which on a shared 2-core box can be
timed far more steadily than a broker run.

One JSON line per (backend, join, planner): ``"join": "c"`` is the worker as shipped
(pipeline/_joincore.c: the join, labeling and commit staging), ``"python"`` the reference of
pipeline/joins.py; on LMDB, ``"planner": "c"`` plans the commit's chunk writes in
pipeline/_storecore.c (as shipped), ``"python"`` with the reference of pipeline/state/lmdb.py.
``ratio`` = the rate over the all-Python rate of the same backend, same run. Each figure is the
best of ``--reps`` runs, alternating, in CPU seconds of this process. The prebuilt batches are moved
out of the collector's sight (``gc.freeze``): a worker's batches come and go, and a full collection
walking half a million benchmark records was ~6% of the run.

Run: ``.venv/bin/python benchmarks/bench_worker_cpu.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_worker import PARTITIONS, emit, machine, make_events  # noqa: E402
from pipeline import joins  # noqa: E402
from pipeline.config import WorkerSettings  # noqa: E402
from pipeline.events import RecordBatch, encode_event, user_key  # noqa: E402
from pipeline.state import open_store  # noqa: E402
from pipeline.worker import GC_GEN0_THRESHOLD, StreamWorker, _gc_threshold  # noqa: E402


class NullProducer:
    def __init__(self) -> None:
        self.n = 0

    def send(self, topic: str, key: bytes | None, value: bytes) -> None:
        self.n += 1

    def send_many(self, topic: str, records: list[tuple[bytes, bytes]]) -> None:
        self.n += len(records)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def batches(n: int, users: int, batch: int) -> list[RecordBatch]:
    """The stream as the consumer hands it over: per partition (murmur2 of the user key, as the
    producer partitions it), poll batches of one partition at a time, round-robin."""
    from kafka.partitioner.default import murmur2

    parts: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
    for e in make_events(n, users):
        parts[(murmur2(user_key(e["user_id"])) & 0x7FFFFFFF) % PARTITIONS].append(encode_event(e))
    out = []
    cursors = dict.fromkeys(parts, 0)
    while any(cursors[p] < len(v) for p, v in parts.items()):
        for p, vals in parts.items():
            a = cursors[p]
            chunk = vals[a:a + batch]
            if chunk:
                out.append(RecordBatch("events", np.full(len(chunk), p, np.int64),
                                       np.arange(a, a + len(chunk), dtype=np.int64), chunk, lambda: []))
                cursors[p] = a + len(chunk)
    return out


def run(batches_: list[RecordBatch], backend: str, impl: joins.JoinImpl, planner: str = "c") -> dict[str, Any]:
    from pipeline.state import lmdb as lmdb_store

    shipped = lmdb_store._append_chunks_many
    if planner == "python":
        lmdb_store._append_chunks_many = lmdb_store.append_chunks_many_ref
    try:
        return _run(batches_, backend, impl)
    finally:
        lmdb_store._append_chunks_many = shipped


def _run(batches_: list[RecordBatch], backend: str, impl: joins.JoinImpl) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-worker-cpu-") as d:
        uri = f"lmdb://{d}/s" if backend == "lmdb" else "memory://"
        store = open_store(uri)
        producer = NullProducer()
        w = StreamWorker(WorkerSettings(store=uri), store, producer, join_impl=impl)
        w.assign([("events", p) for p in range(PARTITIONS)])
        gc.collect()
        with _gc_threshold(GC_GEN0_THRESHOLD):  # as run_worker runs it
            t0 = time.process_time()
            for b in batches_:
                w.process(b)
            w.commit()
            cpu = time.process_time() - t0
        store.close()
    return {"cpu_s": cpu, "samples": producer.n, "events": w.stats.events}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--users", type=int, default=2_000)
    ap.add_argument("--batch", type=int, default=5_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backends", default="lmdb,memory")
    args = ap.parse_args()
    c = joins._load_c()
    if c is None:
        print("pipeline._joincore is not built", file=sys.stderr)
        return 1
    bs = batches(args.events, args.users, args.batch)
    gc.freeze()
    n = sum(map(len, bs))
    for backend in args.backends.split(","):
        variants = [("c", "c"), ("python", "python")] + ([("c", "python")] if backend == "lmdb" else [])
        impls = {"c": c, "python": joins.REFERENCE}
        best: dict[tuple[str, str], dict[str, Any]] = {}
        for _ in range(args.reps):
            for v in variants:
                r = run(bs, backend, impls[v[0]], v[1])
                if v not in best or r["cpu_s"] < best[v]["cpu_s"]:
                    best[v] = r
        if len({r["samples"] for r in best.values()}) != 1:
            raise AssertionError(f"the variants labeled different numbers of samples: {best}")
        rate = {v: n / r["cpu_s"] for v, r in best.items()}
        for v in variants:
            emit({"bench": "worker_cpu", "backend": backend, "join": v[0],
                  "planner": v[1] if backend == "lmdb" else None, "events": n, "batch": args.batch,
                  "samples": best[v]["samples"], "cpu_events_per_s": round(rate[v], 1),
                  "us_per_event": round(1e6 / rate[v], 3), "ratio": round(rate[v] / rate[("python", "python")], 3),
                  "baseline": "join and planner: python, same backend, same run", "machine": machine()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
