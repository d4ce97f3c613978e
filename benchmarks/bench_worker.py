"""Stream worker throughput, broker to committed store state, and sequence-store read latency
(DESIGN.md §5, issue 3). JSON lines on stdout.

1. ``"bench": "worker"``, one line per (client, backend): a fixed synthetic stream is produced
   once to a topic of the embedded broker (Tansu); then, per client, the bare client consumes the
   whole topic (``raw_events_per_s``: the client's own poll loop touching every value, nothing
   else; for kafka-python with the worker's C record parse, pipeline/_kafka_fast.py, and
   ``raw_stock_parse_events_per_s`` with kafka-python's own parse, for comparison) and the worker
   (``run_worker``: decode, validate, join, produce samples, commit) does the same from a fresh
   store; ``events_per_s`` counts from the partition assignment (the group join
   is excluded from both) to the store commit that covers the last event (a checkpoint commits
   every ``--commit-max-events`` records or ``--commit-interval-ms``; the worker's defaults unless
   given; ``--commit-max-events 1`` commits every poll batch). ``ratio`` = worker / raw, in
   the same run. ``cpu_events_per_s`` divides by CPU seconds instead of wall time (the worker
   process's from the assignment to the last commit, plus all of the kafka-python fetch process's,
   ``fetch_process_cpu_s``: its start-up and group join included): on a shared machine it shows what
   the code costs when the wall clock is noisy. With ``--repeat N`` each (client, backend) gets N such
   lines (``"run"``), raw and worker alternating, then one ``"bench": "worker_summary"`` line: min,
   median and max of the rates and ratios, and ``runs_at_target``, the runs whose ratio reached
   ``--target-ratio`` (0.7, issue 3). On the shared 2-core box one run's ratio moves by ±0.2.
2. ``"bench": "read_last_1000"``: read the last 1,000 behaviors of a user whose sequence holds
   100,000 (LMDB, and Redis for comparison), µs per read (mean, p50, p99).
3. ``"bench": "read_while_write"``: reader processes read the last 1,000 behaviors of random users
   while a writer commits worker-sized batches to the same LMDB store: reader latency and writer
   commits/s, against each alone.

Run: ``.venv/bin/python benchmarks/bench_worker.py`` (a few minutes on 2 cores; needs
``redis-server`` for the Redis lines: ``bash infra/ensure-redis.sh``); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline._confluent import FETCH_CONF  # noqa: E402
from pipeline.broker import EmbeddedBroker, create_topics, free_port  # noqa: E402
from pipeline.config import WorkerSettings  # noqa: E402
from pipeline.events import encode_event, user_key  # noqa: E402
from pipeline.kafka import CHECK_CRCS  # noqa: E402
from pipeline.state import Behaviors, StateDelta, open_store  # noqa: E402
from pipeline.worker import run_worker  # noqa: E402

PARTITIONS = 4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit(line: dict[str, Any]) -> None:
    # the 1-minute load average: on a shared machine wall-clock rates fall with it, CPU rates less so
    print(json.dumps({**line, "load_avg_1m": round(os.getloadavg()[0], 2)}), flush=True)


def machine() -> str:
    return f"{os.cpu_count()}-core CPU box ({platform.machine()}, {platform.python_implementation()} " \
           f"{platform.python_version()})"


# ---- a redis-server for the Redis lines ------------------------------------------------------------

class Redis:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Redis | None:
        exe = shutil.which("redis-server")
        if exe is None:
            log("redis-server not found: skipping the Redis lines (bash infra/ensure-redis.sh)")
            return None
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir], stdout=subprocess.DEVNULL)
        import redis

        for _ in range(200):
            try:
                redis.Redis(port=self.port).ping()
                return self
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def uri(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0?namespace=b{uuid.uuid4().hex[:8]}"

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- 1. worker throughput -------------------------------------------------------------------------

def make_events(n: int, users: int, seed: int = 7) -> list[dict[str, Any]]:
    from pipeline.datasets.synthetic import SyntheticConfig, generate

    per_user = max(2, n // users)
    cfg = SyntheticConfig(users=users, behaviors_per_user=max(1, int(per_user * 0.8)),
                          impressions_per_user=max(1, per_user // 7), days=3.0, seed=seed)
    evs = list(generate(cfg).events)
    return evs[:n]


def produce(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    import confluent_kafka as ck

    create_topics(bootstrap, {topic: PARTITIONS, f"{topic}.samples": PARTITIONS, f"{topic}.dlq": 1})
    p = ck.Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.size": 1 << 20,
                     "queue.buffering.max.messages": 2_000_000, "partitioner": "murmur2_random"})
    for e in events:
        while True:
            try:
                p.produce(topic, encode_event(e), user_key(e["user_id"]))
                break
            except BufferError:
                p.poll(0.05)
    assert p.flush(60) == 0


class _Cpu:
    def __enter__(self) -> _Cpu:
        self.t = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.process_time() - self.t


def raw_consume(client: str, bootstrap: str, topic: str, n: int, fast_records: bool = True) -> dict[str, float]:
    """The bare client reading the whole topic: the ceiling for the worker on the same topic. The
    clock starts once the client is connected and knows the topic (the worker's starts at its
    partition assignment, after the group join, so connection setup is outside both).
    ``fast_records``: kafka-python with the worker's C record parse (pipeline/_kafka_fast.py), as
    the worker consumes; False: kafka-python's own parse."""
    t0 = None
    got = 0
    with _Cpu() as cpu:
        if client == "kafka-python":
            from kafka import KafkaConsumer, TopicPartition

            from pipeline import _kafka_fast

            c = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, max_poll_records=5000,
                              fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20, check_crcs=CHECK_CRCS)
            if fast_records and not _kafka_fast.install(c):
                raise RuntimeError("the kafka-python record fast path is not available here")
            c.partitions_for_topic(topic)  # connected, metadata known: as the worker is when assigned
            c.assign([TopicPartition(topic, i) for i in range(PARTITIONS)])
            c.seek_to_beginning()
            t0 = time.perf_counter()
            while got < n:
                for recs in c.poll(1000, max_records=5000).values():
                    for r in recs:
                        _ = r.value
                    got += len(recs)
        else:
            import confluent_kafka as ck

            c = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": f"raw-{uuid.uuid4().hex}",
                             "enable.auto.commit": False, "auto.offset.reset": "earliest", "check.crcs": True,
                             **FETCH_CONF})  # the worker's own fetch settings
            c.list_topics(topic, timeout=10)  # connected, metadata known: as the worker is when assigned
            c.assign([ck.TopicPartition(topic, i, ck.OFFSET_BEGINNING) for i in range(PARTITIONS)])
            t0 = time.perf_counter()
            while got < n:
                # ask for what is left: consume(n, t) waits out t while fewer than n remain
                for m in c.consume(min(5000, n - got), 1.0):
                    if m.error() is None:
                        _ = m.value()
                        got += 1
        dt = time.perf_counter() - t0
        c.close()
    return {"raw_events_per_s": n / dt, "raw_cpu_events_per_s": n / cpu.s, "raw_s": dt}


def worker_run(client: str, bootstrap: str, topic: str, store: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    s = WorkerSettings(bootstrap_servers=bootstrap, events_topic=topic, samples_topic=f"{topic}.samples",
                       dlq_topic=f"{topic}.dlq", group_id=f"bench-{uuid.uuid4().hex[:8]}", store=store,
                       kafka_client=client, max_poll_records=args.batch, exit_when_idle=3,
                       max_poll_interval_ms=3000, session_timeout_ms=3000,
                       commit_interval_ms=args.commit_interval_ms, commit_max_events=args.commit_max_events)
    marks: dict[str, float] = {}
    stop = threading.Event()

    def on_batch(stats: Any) -> None:
        if stats.events >= n:
            stop.set()  # the worker commits what it processed and exits

    import pipeline.worker as W

    orig_assign, orig_commit = W.StreamWorker.assign, W.StreamWorker.commit

    def assign(self: Any, tps: Any) -> Any:  # mark the partition assignment: the group join ends here
        marks.setdefault("assigned", time.perf_counter())
        marks.setdefault("cpu_assigned", time.process_time())
        return orig_assign(self, tps)

    def commit(self: Any, *a: Any, **k: Any) -> bool:  # the end: the commit that stores the last event
        ok = orig_commit(self, *a, **k)
        if ok and "end" not in marks and sum(self.stored_offsets.values()) >= n:
            marks["end"] = time.perf_counter()
            marks["cpu1"] = time.process_time()
        return ok

    W.StreamWorker.assign = assign  # type: ignore[method-assign]
    W.StreamWorker.commit = commit  # type: ignore[method-assign]
    import resource

    def children_cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    child0 = children_cpu()
    try:
        stats = run_worker(s, stop=stop, on_batch=on_batch, install_signals=False)
        child_cpu = children_cpu() - child0  # the fetch process (kafka-python), its whole life: reaped at close
    finally:
        W.StreamWorker.assign = orig_assign  # type: ignore[method-assign]
        W.StreamWorker.commit = orig_commit  # type: ignore[method-assign]
    if "end" not in marks:
        raise RuntimeError(f"worker stopped after {stats.events} of {n} events")
    dt = marks["end"] - marks["assigned"]
    cpu = marks["cpu1"] - marks["cpu_assigned"] + child_cpu
    return {"events_per_s": n / dt, "cpu_events_per_s": n / cpu, "seconds": dt, "batches": stats.batches,
            "commits": stats.commits, "samples": stats.samples, "dead_letters": stats.dead_letters,
            "fetch_process_cpu_s": child_cpu}


def _child_call(conn: Any, fn: Any, args: tuple[Any, ...]) -> None:
    try:
        conn.send((True, fn(*args)))
    except BaseException as e:  # noqa: BLE001 - raised again in the parent
        conn.send((False, e))


def _in_child(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a freshly spawned process (not a daemon: the worker starts its fetch process);
    its result back here."""
    ctx = mp.get_context("spawn")
    r, w = ctx.Pipe(False)
    p = ctx.Process(target=_child_call, args=(w, fn, args))
    p.start()
    w.close()
    try:
        ok, res = r.recv()
    except EOFError:
        p.join()
        raise RuntimeError(f"benchmark child exited with code {p.exitcode}") from None
    p.join()
    if not ok:
        raise res
    return res


def bench_worker(args: argparse.Namespace, redis: Redis | None) -> None:
    log(f"generating {args.events} events over {args.users} users")
    events = make_events(args.events, args.users)
    n = len(events)
    with EmbeddedBroker() as broker:
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        t = time.perf_counter()
        produce(broker.bootstrap, topic, events)
        # The event dicts are the benchmark's, not the worker's: kept alive, every full garbage
        # collection inside the timed worker run would traverse them (measured: ~20% of its CPU).
        del events
        gc.collect()
        log(f"produced {n} events in {time.perf_counter() - t:.1f}s")
        for client in args.clients:
            for backend in args.backends:
                if backend == "redis" and redis is None:
                    continue
                lines = [worker_line(args, client, backend, broker, topic, n, redis, run)
                         for run in range(args.repeat)]
                if args.repeat > 1:
                    emit(summary_line(lines, args.target_ratio))


def worker_line(args: argparse.Namespace, client: str, backend: str, broker: EmbeddedBroker, topic: str, n: int,
                redis: Redis | None, run: int) -> dict[str, Any]:
    """One raw consume and one worker run, each in a fresh process, one after the other: one line."""
    tmp = tempfile.mkdtemp(prefix="bench-store-")
    try:
        store = f"lmdb://{tmp}/store" if backend == "lmdb" else redis.uri()  # type: ignore[union-attr]
        # each in a fresh process, as a worker runs: nothing left over from an earlier
        # line (warm id caches, a grown heap, a closed client's threads) changes the next
        raw = _in_child(raw_consume, client, broker.bootstrap, topic, n)
        if client == "kafka-python":  # kafka-python's own record parse, for comparison
            stock = _in_child(raw_consume, client, broker.bootstrap, topic, n, False)
            raw["raw_stock_parse_events_per_s"] = stock["raw_events_per_s"]
        log(f"{client}: raw {raw['raw_events_per_s']:.0f} ev/s; worker on {backend}...")
        w = _in_child(worker_run, client, broker.bootstrap, topic, store, n, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    line = {"bench": "worker", "client": client, "backend": backend, "run": run, "events": n, "users": args.users,
            "partitions": PARTITIONS, "batch": args.batch, "commit_interval_ms": args.commit_interval_ms,
            "commit_max_events": args.commit_max_events, "check_crcs": CHECK_CRCS if client ==
            "kafka-python" else True, **{k: round(v, 1) if isinstance(v, float) else v
                                         for k, v in {**w, **raw}.items()},
            "ratio": round(w["events_per_s"] / raw["raw_events_per_s"], 3),
            "cpu_ratio": round(w["cpu_events_per_s"] / raw["raw_cpu_events_per_s"], 3),
            "machine": machine()}
    emit(line)
    return line


def summary_line(lines: list[dict[str, Any]], target: float) -> dict[str, Any]:
    """Over the ``--repeat`` runs of one client and backend: the spread of the rates and ratios, and in
    how many runs the ratio reached the target (on a shared 2-core box one run says little)."""
    def spread(key: str) -> dict[str, float]:
        v = np.array([ln[key] for ln in lines], float)
        return {f"{key}_min": round(float(v.min()), 3), f"{key}_median": round(float(np.median(v)), 3),
                f"{key}_max": round(float(v.max()), 3)}

    first = lines[0]
    return {"bench": "worker_summary", "client": first["client"], "backend": first["backend"], "runs": len(lines),
            "events": first["events"], **spread("events_per_s"), **spread("raw_events_per_s"), **spread("ratio"),
            **spread("cpu_ratio"), "target_ratio": target,
            "runs_at_target": sum(ln["ratio"] >= target for ln in lines), "machine": first["machine"]}


# ---- 2. read latency ------------------------------------------------------------------------------

def fill(store: Any, user: int, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    step = 5000
    for i in range(0, n, step):
        k = min(step, n - i)
        store.commit(StateDelta("bench", appends={user: Behaviors(
            rng.integers(1, 1 << 62, k, dtype=np.int64), rng.integers(1, 1 << 40, k, dtype=np.int64),
            rng.integers(1, 6, k).astype(np.uint8), 1_767_225_600_000 + np.arange(i, i + k, dtype=np.int64))}))


def time_reads(store: Any, user: int, reads: int, max_len: int = 1000) -> np.ndarray:
    out = np.empty(reads)
    for i in range(reads):
        t = time.perf_counter()
        b = store.read(user, max_len=max_len)
        out[i] = time.perf_counter() - t
        assert len(b) == max_len
    return out * 1e6


def bench_reads(args: argparse.Namespace, redis: Redis | None) -> None:
    tmp = tempfile.mkdtemp(prefix="bench-read-")
    try:
        uris = [("lmdb", f"lmdb://{tmp}/store")] + ([("redis", redis.uri())] if redis else [])
        for backend, uri in uris:
            w = open_store(uri)
            fill(w, 42, args.seq_len)
            r = w if backend == "lmdb" else open_store(uri, readonly=True)  # LMDB: one env per process
            time_reads(r, 42, 200)  # warm
            us = time_reads(r, 42, args.reads)
            emit({"bench": "read_last_1000", "backend": backend, "seq_len": r.length(42), "max_len": 1000,
                  "mean_us": round(float(us.mean()), 1), "p50_us": round(float(np.percentile(us, 50)), 1),
                  "p99_us": round(float(np.percentile(us, 99)), 1), "reads": args.reads, "machine": machine()})
            if r is not w:
                r.close()
            w.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- 3. read while write --------------------------------------------------------------------------

def _reader(uri: str, users: int, seconds: float, q: Any) -> None:
    s = open_store(uri, readonly=True)
    rng = np.random.default_rng(os.getpid())
    lat = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        u = int(rng.integers(1, users + 1))
        t = time.perf_counter()
        s.read(u, max_len=1000)
        lat.append(time.perf_counter() - t)
    q.put(np.asarray(lat) * 1e6)


def _writer(uri: str, users: int, seconds: float, q: Any) -> None:
    """Worker-sized commits: 5,000 behaviors over 500 users per commit."""
    s = open_store(uri)
    rng = np.random.default_rng(1)
    commits = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        us = rng.integers(1, users + 1, 500)
        appends = {int(u): Behaviors(rng.integers(1, 1 << 62, 10, dtype=np.int64),
                                     rng.integers(1, 1 << 40, 10, dtype=np.int64),
                                     np.ones(10, np.uint8), np.full(10, 1_767_225_600_000, np.int64))
                   for u in us}
        s.commit(StateDelta("bench", appends=appends, offsets={("events", 0): commits + 1}))
        commits += 1
    q.put(commits / seconds)


def bench_read_while_write(args: argparse.Namespace) -> None:
    tmp = tempfile.mkdtemp(prefix="bench-rw-")
    users, seconds = 2000, args.rw_seconds
    try:
        uri = f"lmdb://{tmp}/store"
        s = open_store(uri)
        for u in range(1, users + 1, 100):  # 2,000 users with 5,000 behaviors each
            s.commit(StateDelta("bench", appends={v: Behaviors(np.arange(5000, dtype=np.int64),
                                                               np.arange(5000, dtype=np.int64),
                                                               np.ones(5000, np.uint8),
                                                               np.arange(5000, dtype=np.int64))
                                                  for v in range(u, u + 100)}))
        s.close()
        ctx = mp.get_context("spawn")

        def run(readers: int, writer: bool) -> tuple[np.ndarray | None, float | None]:
            q: Any = ctx.Queue()
            procs = [ctx.Process(target=_reader, args=(uri, users, seconds, q)) for _ in range(readers)]
            if writer:
                procs.append(ctx.Process(target=_writer, args=(uri, users, seconds, q)))
            for p in procs:
                p.start()
            got = [q.get(timeout=seconds + 120) for _ in procs]
            for p in procs:
                p.join(30)
            lat = [g for g in got if isinstance(g, np.ndarray)]
            rate = [g for g in got if not isinstance(g, np.ndarray)]
            return (np.concatenate(lat) if lat else None), (rate[0] if rate else None)

        alone_lat, _ = run(args.readers, False)
        _, alone_rate = run(0, True)
        lat, rate = run(args.readers, True)
        assert alone_lat is not None and lat is not None and alone_rate and rate

        def pct(a: np.ndarray, q: float) -> float:
            return round(float(np.percentile(a, q)), 1)

        emit({"bench": "read_while_write", "backend": "lmdb", "readers": args.readers, "seconds": seconds,
              "read_p50_us": pct(lat, 50), "read_p99_us": pct(lat, 99), "reads_per_s": round(len(lat) / seconds),
              "read_p50_us_alone": pct(alone_lat, 50), "read_p99_us_alone": pct(alone_lat, 99),
              "reads_per_s_alone": round(len(alone_lat) / seconds),
              "writer_commits_per_s": round(rate, 1), "writer_commits_per_s_alone": round(alone_rate, 1),
              "commit": "500 users x 10 behaviors", "machine": machine()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=500_000,
                    help="stream length; at 150k+ events/s a shorter run is mostly start-up and noise")
    ap.add_argument("--users", type=int, default=2_000)
    ap.add_argument("--batch", type=int, default=5_000, help="max_poll_records of the worker")
    ap.add_argument("--commit-interval-ms", type=int, default=WorkerSettings().commit_interval_ms)
    ap.add_argument("--commit-max-events", type=int, default=WorkerSettings().commit_max_events,
                    help="1: commit every poll batch (the worker before the commit policy)")
    ap.add_argument("--clients", default="kafka-python,confluent")
    ap.add_argument("--backends", default="lmdb,redis")
    ap.add_argument("--seq-len", type=int, default=100_000)
    ap.add_argument("--reads", type=int, default=5_000)
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--rw-seconds", type=float, default=5.0)
    ap.add_argument("--only", default="worker,read,rw", help="subset of worker,read,rw")
    ap.add_argument("--repeat", type=int, default=1,
                    help="worker lines per client and backend (raw and worker alternate), then a summary line")
    ap.add_argument("--target-ratio", type=float, default=0.7, help="the summary counts runs at or above it")
    ap.add_argument("--quick", action="store_true", help="small smoke configuration")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.quick:
        args.events, args.users, args.seq_len, args.reads, args.rw_seconds = 20_000, 200, 100_000, 500, 1.0
    args.clients = args.clients.split(",")
    args.backends = args.backends.split(",")
    only = set(args.only.split(","))
    with Redis() as redis:
        if "read" in only:
            bench_reads(args, redis)
        if "rw" in only:
            bench_read_while_write(args)
        if "worker" in only:
            bench_worker(args, redis)
    return 0


if __name__ == "__main__":
    sys.exit(main())
