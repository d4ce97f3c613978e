"""Scorer latency over real gRPC, server in another process (DESIGN.md §5, issue 7).

For every model in ``--models`` and sequence length in ``--seq-lens`` this script builds an
untrained ranker (``models.build_ranker``; weights do not change the cost), saves it to a
directory model source, starts ``python -m serving.cli serve`` as a subprocess on 127.0.0.1 over an
LMDB store of synthetic users (every user has ``max(seq_lens)`` behaviors), waits for health
SERVING, then sends Score requests one at a time (closed loop, concurrency 1) from this process and
times each call end to end (client serialisation, network, server, deserialisation).

Two cache regimes, both printed:

- ``"cache": "cold"`` (the headline): the server runs with ``--cache-mb 0``, so every request reads
  the user's sequence from LMDB and encodes it (SDIM bucket table, DARE keys, DIN embeddings) before
  scoring: the cost of a user's first request, or of one whose sequence changed past what an
  incremental extension can absorb.
- ``"cache": "warm"``: cache on, a few users repeated, so the per-user encoding is reused and only
  the candidate side runs (a user scored again with no new behavior in between).
- ``"cache": "append"``: cache on, a few users repeated, and before every request (untimed) this
  process appends one new behavior to that user's sequence in the store, so the server extends the
  cached encoding with it (``"extend"`` outcome). Every user's window is full, so the oldest
  behavior leaves it: SDIM subtracts it from its bucket sums, DIN/DARE re-cut the window. This is
  the steady state of an active user.

One JSON line per (model, candidates, seq_len, cache)::

    {"model", "candidates", "seq_len", "cache", "p50_ms", "p99_ms", "qps", "requests", ...}

``qps`` is completed requests per second of this closed loop (1 / mean latency); sdim/dare lines
carry ``"speedup_vs_din_long"`` = din_long p50 / this p50 at the same candidates, seq_len and cache.
din_long at long L is slow, so every configuration stops after ``--budget-s`` seconds with at least
``--min-requests`` calls, and ``requests`` says how many were timed; p99 of a few samples is the max.

Run: ``.venv/bin/python benchmarks/bench_scorer.py`` (about 5-10 minutes on 2 CPU cores);
``--quick`` runs a small smoke configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.events import hash_id  # noqa: E402
from pipeline.state import Behaviors, StateDelta, open_store  # noqa: E402
from serving.client import ScorerClient  # noqa: E402
from serving.proto import scorer_pb2  # noqa: E402

N_ITEMS = 200_000  # distinct raw item ids in the synthetic catalogue
N_CATS = 2_000  # distinct raw category ids


def log(msg: str) -> None:
    print(f"[bench_scorer] {msg}", file=sys.stderr, flush=True)


def fill_store(uri: str, users: int, length: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    item_ids = np.array([hash_id(f"i{k}") for k in range(N_ITEMS)], dtype=np.int64)
    cat_ids = np.array([hash_id(f"c{k}") for k in range(N_CATS)], dtype=np.int64)
    store = open_store(uri)
    try:
        for start in range(0, users, 8):  # a few users per commit keeps transactions small
            appends = {}
            for u in range(start, min(users, start + 8)):
                k = rng.integers(0, N_ITEMS, length)
                appends[hash_id(f"user{u}")] = Behaviors(
                    item_ids[k], cat_ids[k % N_CATS], rng.integers(1, 4, length).astype(np.uint8),
                    np.arange(length, dtype=np.int64) * 1000)
            store.commit(StateDelta("bench", appends=appends))
    finally:
        store.close()


def save_model(preset: str, seq_len: int, root: Path) -> None:
    from models import FeatureSpec, build_ranker, save_ranker

    ranker = build_ranker(preset, FeatureSpec(seq_len=seq_len))
    save_ranker(ranker, root / "1")
    (root / "champion").write_text("1")


class Server:
    """``python -m serving.cli serve`` in a subprocess; the port comes from its listening log line."""

    def __init__(self, store_uri: str, model_dir: Path, cache_mb: int, torch_threads: int, workers: int) -> None:
        cmd = [sys.executable, "-m", "serving.cli", "serve", "--store", store_uri, "--model-dir", str(model_dir),
               "--port", "0", "--cache-mb", str(cache_mb), "--torch-threads", str(torch_threads),
               "--workers", str(workers), "--poll-interval", "5", "--grace", "1", "--max-candidates", "5000",
               "--metrics-port", "0"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.port, self.metrics_port = self._wait_port()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in iter(self.proc.stderr.readline, ""):
            self.lines.append(line)

    def _wait_port(self, timeout: float = 120) -> tuple[int, int | None]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if '"scorer listening"' in line:
                    rec = json.loads(line)
                    return int(rec["address"].rsplit(":", 1)[1]), rec.get("metrics_port")
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("scorer did not start:\n" + "".join(self.lines[-30:]))

    def cache_outcomes(self) -> dict[str, int]:
        """The server's ``ctrstream_scorer_encoding_cache_total`` counters by outcome (cumulative)."""
        if self.metrics_port is None:
            return {}
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:  # noqa: S310
            text = r.read().decode()
        out: dict[str, int] = {}
        for line in text.splitlines():
            if line.startswith("ctrstream_scorer_encoding_cache_total{"):
                outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
                out[outcome] = int(float(line.rsplit(" ", 1)[1]))
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if rc != 0:
            log(f"server exited with {rc}:\n" + "".join(self.lines[-20:]))


def make_requests(n: int, candidates: int, users: list[str], seed: int) -> list[scorer_pb2.ScoreRequest]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ks = rng.integers(0, N_ITEMS, candidates)
        out.append(scorer_pb2.ScoreRequest(
            user_id=users[i % len(users)],
            candidates=[scorer_pb2.Candidate(item_id=f"i{k}", category_id=f"c{k % N_CATS}") for k in ks]))
    return out


class Appender:
    """Appends one synthetic behavior to a user's sequence before a request (the ``append`` regime).
    The benchmark process is the store's only writer; the server reads the same LMDB store."""

    def __init__(self, uri: str, seed: int = 1) -> None:
        self.store = open_store(uri)
        self.rng = np.random.default_rng(seed)
        self.ts = 10**12

    def __call__(self, user_id: str) -> None:
        k = int(self.rng.integers(0, N_ITEMS))
        self.ts += 1000
        beh = Behaviors(np.array([hash_id(f"i{k}")], np.int64), np.array([hash_id(f"c{k % N_CATS}")], np.int64),
                        np.array([1], np.uint8), np.array([self.ts], np.int64))
        self.store.commit(StateDelta("bench-append", appends={hash_id(user_id): beh}))

    def close(self) -> None:
        self.store.close()


def drive(client: ScorerClient, requests: list[scorer_pb2.ScoreRequest], budget_s: float, min_requests: int,
          timeout: float, before: Any = None) -> list[float]:
    lat: list[float] = []
    started = time.perf_counter()
    for req in requests:
        if before is not None:
            before(req.user_id)  # untimed
        t0 = time.perf_counter()
        resp, _ = client.score_request(req, timeout=timeout)
        lat.append(time.perf_counter() - t0)
        assert len(resp.scores) == len(req.candidates)
        if time.perf_counter() - started > budget_s and len(lat) >= min_requests:
            break
    return lat


def summarise(model: str, candidates: int, seq_len: int, cache: str, lat: list[float]) -> dict[str, Any]:
    a = np.asarray(lat) * 1000
    return {"model": model, "candidates": candidates, "seq_len": seq_len, "cache": cache,
            "p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "qps": round(len(a) / (a.sum() / 1000), 1), "requests": len(a)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sdim,dare,din_long")
    p.add_argument("--candidates", default="200,1000")
    p.add_argument("--seq-lens", default="1000,10000")
    p.add_argument("--users", type=int, default=48, help="synthetic users in the store (cold requests cycle them)")
    p.add_argument("--requests", type=int, default=300, help="timed requests per configuration (at most)")
    p.add_argument("--warmup", type=int, default=5, help="untimed requests before timing")
    p.add_argument("--budget-s", type=float, default=20.0, help="time budget per configuration")
    p.add_argument("--min-requests", type=int, default=5, help="timed requests even past the budget")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--caches", default="cold,warm,append",
                   help="cold (cache off), warm (cache on, repeated users), append (warm + one new behavior "
                        "per request)")
    p.add_argument("--keep", action="store_true", help="keep the temporary store and models")
    p.add_argument("--quick", action="store_true", help="smoke run: sdim,din_long at L=1000, 200 candidates")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.candidates, args.seq_lens = "sdim,din_long", "200", "1000"
        args.users, args.requests, args.budget_s = 8, 30, 5.0
    models = args.models.split(",")
    cand_counts = [int(x) for x in args.candidates.split(",")]
    seq_lens = [int(x) for x in args.seq_lens.split(",")]
    caches = args.caches.split(",")

    tmp = Path(tempfile.mkdtemp(prefix="bench-scorer-"))
    store_uri = f"lmdb://{tmp / 'store'}"
    t0 = time.perf_counter()
    fill_store(store_uri, args.users, max(seq_lens))
    log(f"store: {args.users} users x {max(seq_lens)} behaviors in {time.perf_counter() - t0:.1f}s")
    results: list[dict[str, Any]] = []
    load = os.getloadavg()[0]
    users = [f"user{u}" for u in range(args.users)]
    try:
        for seq_len in seq_lens:
            for model in models:
                mdir = tmp / f"{model}-{seq_len}"
                save_model(model, seq_len, mdir)
                for cache in caches:
                    server = Server(store_uri, mdir, 0 if cache == "cold" else 256, args.torch_threads, args.workers)
                    try:
                        with ScorerClient(f"127.0.0.1:{server.port}", max_message_bytes=16 << 20) as client:
                            deadline = time.monotonic() + 120
                            while client.health() != "SERVING":
                                if time.monotonic() > deadline:
                                    raise RuntimeError("scorer never became SERVING")
                                time.sleep(0.1)
                            for n_cand in cand_counts:
                                pool = users if cache == "cold" else users[:4]
                                reqs = make_requests(args.warmup + args.requests, n_cand, pool, seed=n_cand)
                                warm_started = time.perf_counter()
                                for i, r in enumerate(reqs[: max(args.warmup, 4)]):
                                    if cache == "cold" and i >= args.warmup:
                                        break
                                    client.score_request(r, timeout=600)  # warm up, and fill the cache
                                    slow = time.perf_counter() - warm_started > args.budget_s / 2
                                    if slow and (cache == "cold" or i >= 3):  # din_long at long L
                                        break
                                before_outcomes = server.cache_outcomes()
                                appender = Appender(store_uri) if cache == "append" else None
                                try:
                                    lat = drive(client, reqs[args.warmup:], args.budget_s, args.min_requests, 600,
                                                before=appender)
                                finally:
                                    if appender is not None:
                                        appender.close()
                                res = summarise(model, n_cand, seq_len, cache, lat)
                                after_outcomes = server.cache_outcomes()  # timed requests only
                                res["server_cache_outcomes"] = {k: v - before_outcomes.get(k, 0)
                                                                for k, v in after_outcomes.items()
                                                                if v - before_outcomes.get(k, 0)}
                                results.append(res)
                                log(json.dumps(res))
                    finally:
                        server.stop()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    base = {(r["candidates"], r["seq_len"], r["cache"]): r for r in results if r["model"] == "din_long"}
    for r in results:
        b = base.get((r["candidates"], r["seq_len"], r["cache"]))
        if r["model"] in ("sdim", "dare") and b is not None:
            r["speedup_vs_din_long"] = round(b["p50_ms"] / r["p50_ms"], 1)
        r.update({"torch_threads": args.torch_threads, "workers": args.workers, "host_cpus": os.cpu_count(),
                  "loadavg_1m_at_start": round(load, 2)})
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
