"""Trainer throughput: samples/s per model and the share of time spent outside the model step.

Runs the online trainer's real per-batch path (``OnlineTrainer.learn``: de-duplication, LMDB reads
as of ``seq_pos``, ``build_batch``, shadow champion scoring if any, progressive metrics, one
optimiser step, async MLflow logging) on a pre-filled LMDB store, without Kafka in the loop (the
consume rate is the worker benchmark's subject). Prints one JSON line per (model, seq_len):

    {"bench": "trainer", "model", "seq_len", "batch", "samples_per_s", "step_ms", "data_ms",
     "data_share", "target_data_share": 0.25, "machine"}

``data_share`` = data path time / (data path + model step) time, measured in the same run: the
DESIGN.md §5 target is ≤ 0.25.

Usage: ``python benchmarks/bench_trainer.py [--models din,sdim,dare] [--seq-lens 1000,10000]
[--steps 8] [--batch 256]``
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models.online import OnlineTrainer, TrainerSettings
from pipeline.state import Behaviors, StateDelta, open_store


def fill_store(path: Path, users: int, length: int, seed: int = 0) -> str:
    uri = f"lmdb://{path}"
    store = open_store(uri)
    rng = np.random.default_rng(seed)
    for u in range(1, users + 1):
        n = length
        cats = rng.integers(1, 300, n)
        store.commit(StateDelta("bench", appends={u: Behaviors(
            cats * 40 + rng.integers(0, 40, n), cats, rng.integers(1, 6, n).astype(np.uint8),
            np.arange(n, dtype=np.int64) * 1000)}))
    store.close()
    return uri


def samples(n: int, users: int, length: int, start: int, rng: np.random.Generator) -> list[dict]:
    out = []
    for i in range(n):
        u = int(rng.integers(1, users + 1))
        out.append({"sample_id": f"b{start + i}", "user_hash": u, "item_hash": int(rng.integers(1, 12000)),
                    "category_hash": int(rng.integers(1, 300)), "seq_pos": int(rng.integers(length // 2, length + 1)),
                    "label": int(rng.random() < 0.3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="din,sdim,dare,din_long,diffumin")
    ap.add_argument("--seq-lens", default="1000,10000")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per (model, seq_len), after 1 warm-up")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lens = [int(x) for x in args.seq_lens.split(",")]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        uri = fill_store(Path(tmp) / "store", args.users, max(lens) + 100)
        for model in args.models.split(","):
            for seq_len in lens:
                s = TrainerSettings(store=uri, models=model, seq_len=seq_len, short_len=50,
                                    batch_size=args.batch, item_buckets=1 << 15, category_buckets=1 << 10,
                                    tracking_uri=f"sqlite:///{tmp}/mlflow.db", checkpoint_dir=f"{tmp}/ck-{model}",
                                    checkpoint_every=10**9, state_every=10**9)
                tr = OnlineTrainer(s)
                slot = tr.slots[0]
                tr.learn(samples(args.batch, args.users, seq_len, 0, rng))  # warm-up
                data0, step0 = tr.data_s, slot.step_s
                t0 = time.perf_counter()
                for k in range(args.steps):
                    tr.learn(samples(args.batch, args.users, seq_len, (k + 1) * args.batch, rng))
                wall = time.perf_counter() - t0
                data, step = tr.data_s - data0, slot.step_s - step0
                n = args.steps * args.batch
                print(json.dumps({
                    "bench": "trainer", "model": model, "seq_len": seq_len, "batch": args.batch,
                    "samples_per_s": round(n / wall, 1), "step_ms": round(1000 * step / args.steps, 1),
                    "data_ms": round(1000 * data / args.steps, 1), "data_share": round(data / (data + step), 3),
                    "target_data_share": 0.25, "threads": args.threads,
                    "machine": f"{platform.machine()} {torch.get_num_threads()} threads, CPU",
                }), flush=True)
                tr.finish()


if __name__ == "__main__":
    main()
