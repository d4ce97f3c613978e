"""``ctrstream demo``: the whole pipeline on embedded defaults, end to end, as separate processes.

broker (Tansu) → produce the synthetic long-range stream (plus a few deliberately malformed
records) → worker process (LMDB store, samples + DLQ) running concurrently with the online trainer
(DIN on the last 50 vs SDIM over 1,000 behaviors, MLflow SQLite store, registry + champion) →
scorer process (gRPC, champion of the best model) → a few hundred scoring calls → summary.
Exits non-zero if any stage failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["run_demo", "DemoFailure"]

#: Hand-made bad records the demo injects to show the dead-letter path.
BAD_RECORDS: list[bytes] = [
    b"\xff\xfe not json",
    b'{"type": "behavior", "user_id": 1}',
    b'{"type": "impression", "user_id": 1, "item_id": 5, "ts": 1767225600000}',
    b'{"type": "behavior", "user_id": 1, "item_id": 5, "ts": -3}',
    b'{"type": "teleport", "user_id": 1, "item_id": 5, "ts": 1767225600000}',
    b'{"type": "behavior", "user_id": [1], "item_id": 5, "ts": 1767225600000}',
    b'{"type": "behavior", "user_id": 1, "item_id": 5, "ts": "yesterday"}',
    b"[1, 2, 3]",
]


#: After the worker finished, how long the trainer may take to learn the remaining samples.
TRAIN_DRAIN_TIMEOUT_S = 600


class DemoFailure(RuntimeError):
    pass


def _ctrstream() -> list[str]:
    return [sys.executable, "-m", "pipeline.cli"]


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from models.online import TrainerSettings, run_trainer
    from pipeline.broker import EmbeddedBroker, create_topics, free_port
    from pipeline.config import ProduceSettings
    from pipeline.datasets.synthetic import SyntheticConfig, generate
    from pipeline.kafka import make_producer
    from pipeline.produce import produce_events

    console = Console(stderr=False, width=None if sys.stdout.isatty() else 120)  # logs keep full tables
    work = Path(args.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    store_uri = f"lmdb://{work / 'store'}"
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    t_start = time.monotonic()
    summary: dict[str, Any] = {"workdir": str(work)}
    cfg_kw = {k: v for k, v in {"users": args.users, "behaviors_per_user": args.behaviors,
                                 "impressions_per_user": args.impressions}.items() if v is not None}
    cfg = SyntheticConfig(seed=args.seed, **cfg_kw)
    progress = Progress(TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
    worker_proc: subprocess.Popen[str] | None = None
    server_proc: subprocess.Popen[str] | None = None
    with EmbeddedBroker() as broker, progress:
        bootstrap = broker.bootstrap
        common: dict[str, Any] = {"bootstrap_servers": bootstrap}
        # 1. worker process first: its group join (up to max_poll_interval) overlaps production ----
        from pipeline.state import open_store

        open_store(store_uri).close()  # create it, so the trainer can open it read-only right away
        create_topics(bootstrap, {"events": 4, "samples": 4, "events.dlq": 1})
        worker_log = open(work / "worker.log", "w")  # noqa: SIM115
        worker_proc = subprocess.Popen(
            _ctrstream() + ["worker", "--bootstrap-servers", bootstrap, "--store", store_uri,
                            "--exit-when-idle", "5", "--drain-on-exit", "--max-poll-interval-ms", "20000",
                            "--session-timeout-ms", "10000"],
            stdout=subprocess.PIPE, stderr=worker_log, text=True)
        # 2. produce --------------------------------------------------------------------------------
        stream = generate(cfg)
        summary["bayes_auc"] = stream.bayes_auc
        t_prod = progress.add_task("produce", total=len(stream.events) + len(BAD_RECORDS), info="")
        ps = ProduceSettings(**common)
        n = produce_events(ps, stream.events, progress=lambda k: progress.update(t_prod, completed=k))
        bad = make_producer(ps.kafka_client, bootstrap)
        for rec in BAD_RECORDS:
            bad.send(ps.events_topic, b"1", rec)
        bad.flush()
        bad.close()
        progress.update(t_prod, completed=n + len(BAD_RECORDS), info=f"{n:,} events + {len(BAD_RECORDS)} bad")
        summary["events_in"] = n + len(BAD_RECORDS)

        expected: dict[str, int] = {}

        def wait_worker() -> None:
            assert worker_proc is not None and worker_proc.stdout is not None
            out = worker_proc.stdout.read()
            worker_proc.wait()
            for line in out.splitlines():
                if line.startswith("{"):
                    expected.update(json.loads(line).get("worker", {}))

        wt = threading.Thread(target=wait_worker, daemon=True)
        wt.start()

        # 3. trainer (this process) ------------------------------------------------------------------
        total_imps = len(stream.labels)
        t_train = progress.add_task("train", total=total_imps, info="waiting for samples")
        stop = threading.Event()
        models = args.models

        def on_step(tr: Any) -> None:
            info = "  ".join(f"{s.preset} auc={s.window.metrics().get('auc', float('nan')):.3f}" for s in tr.slots)
            progress.update(t_train, completed=tr.samples + tr.duplicates, info=info)

        # 2 cores: while the worker process runs, one torch thread (oversubscribed OpenMP threads spin
        # and thrash); all cores once it is done.
        torch.set_num_threads(1)

        def watchdog() -> None:
            wt.join()
            torch.set_num_threads(max(1, os.cpu_count() or 1))
            if worker_proc is not None and worker_proc.returncode != 0:
                stop.set()
                return
            target = expected.get("samples", 0)
            deadline = time.monotonic() + TRAIN_DRAIN_TIMEOUT_S
            while time.monotonic() < deadline and not stop.is_set():
                tr = trainer_ref[0] if trainer_ref else None
                if tr is not None and tr.samples >= target:
                    break
                time.sleep(0.2)
            stop.set()

        trainer_ref: list[Any] = []

        def on_step_ref(tr: Any) -> None:
            if not trainer_ref:
                trainer_ref.append(tr)
            on_step(tr)

        threading.Thread(target=watchdog, daemon=True).start()
        ts = TrainerSettings(bootstrap_servers=bootstrap, store=store_uri, models=models, tracking_uri=tracking_uri,
                             seq_len=1000, short_len=50, lr=1e-2, checkpoint_dir=str(work / "trainer"),
                             item_buckets=1 << 15, category_buckets=1 << 10, checkpoint_every=4000)
        reports = run_trainer(ts, stop=stop, on_step=on_step_ref, install_signals=False)
        wt.join(timeout=60)
        if worker_proc.returncode != 0:
            raise DemoFailure(f"worker exited with {worker_proc.returncode}; see {work / 'worker.log'}")
        summary["worker"] = expected
        summary["models"] = [r.__dict__ for r in reports]
        if not all(r.samples for r in reports):
            raise DemoFailure("the trainer learned no samples")

        # 4. scorer process on the best model's champion ---------------------------------------------
        best = max(reports, key=lambda r: (r.auc if r.auc == r.auc else -1))
        if best.champion is None:
            raise DemoFailure(f"{best.registered_name} has no champion")
        port = free_port()
        server_log = open(work / "scorer.log", "w")  # noqa: SIM115
        server_proc = subprocess.Popen(
            _ctrstream() + ["serve", "--store", store_uri, "--model-name", best.registered_name,
                            "--tracking-uri", tracking_uri, "--port", str(port), "--host", "127.0.0.1"],
            stdout=server_log, stderr=subprocess.STDOUT, text=True)
        latencies, versions = _score_calls(progress, f"127.0.0.1:{port}", server_proc, stream, args)
        server_proc.send_signal(signal.SIGTERM)
        rc = server_proc.wait(30)
        if rc != 0:
            raise DemoFailure(f"scorer exited with {rc} after SIGTERM; see {work / 'scorer.log'}")
        summary["scorer"] = {"calls": len(latencies), "candidates": args.candidates,
                             "p50_ms": _percentile(latencies, 50), "p99_ms": _percentile(latencies, 99),
                             "model": best.registered_name, "versions": sorted(versions)}
    summary["seconds"] = time.monotonic() - t_start
    _print_summary(console, summary, tracking_uri, work)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2, default=str))
    return 0


def _score_calls(progress: Any, target: str, proc: subprocess.Popen[str], stream: Any,
                 args: argparse.Namespace) -> tuple[list[float], set[str]]:
    from serving.client import ScorerClient

    client = ScorerClient(target)
    deadline = time.monotonic() + 120
    while True:
        try:
            if client.health(timeout=1.0) == "SERVING":
                break
        except Exception:  # noqa: BLE001, S110 - not listening yet
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise DemoFailure("scorer did not become ready (see scorer.log)")
        time.sleep(0.2)
    rng = np.random.default_rng(args.seed)
    cfg = stream.config
    items_all = cfg.categories * cfg.items_per_category
    task = progress.add_task("score", total=args.score_calls, info=f"{args.candidates} candidates/call")
    latencies: list[float] = []
    versions: set[str] = set()
    for _ in range(args.score_calls):
        user = int(rng.integers(cfg.users))
        items = rng.integers(items_all, size=args.candidates)
        cats = items // cfg.items_per_category
        t0 = time.perf_counter()
        scores, _name, version = client.score(str(user), [str(i) for i in items], [str(c) for c in cats], timeout=5.0)
        latencies.append(1000 * (time.perf_counter() - t0))
        versions.add(version)
        if len(scores) != args.candidates or not all(0.0 < s < 1.0 for s in scores):
            raise DemoFailure(f"bad scores from the scorer: {scores[:5]}…")
        progress.advance(task)
    client.close()
    return latencies, versions


def _print_summary(console: Any, s: dict[str, Any], tracking_uri: str, work: Path) -> None:
    from rich.table import Table

    w = s.get("worker", {})
    t = Table(title="ctrstream demo summary", show_header=True)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("events in (incl. bad)", f"{s['events_in']:,}")
    t.add_row("samples out (positives)", f"{w.get('samples', 0):,} ({w.get('positives', 0):,})")
    t.add_row("dead letters (events.dlq)", f"{w.get('dead_letters', 0):,}")
    t.add_row("synthetic Bayes-optimal AUC", f"{s['bayes_auc']:.4f}")
    console.print(t)
    m = Table(title="online training (progressive validation: score, then learn)")
    for col in ("model", "samples", "progressive AUC", "logloss", "last-window AUC", "samples/s", "versions",
                "champion"):
        m.add_column(col, justify="right")
    for r in s["models"]:
        m.add_row(r["preset"], f"{r['samples']:,}", f"{r['auc']:.4f}", f"{r['logloss']:.4f}", f"{r['window_auc']:.4f}",
                  f"{r['samples_per_s']:.0f}", ",".join(r["versions"]),
                  f"{r['registered_name']} v{r['champion']}" if r["champion"] else "-")
    console.print(m)
    sc = s["scorer"]
    console.print(f"scorer: {sc['model']} versions {','.join(sc['versions'])}, {sc['calls']} calls x "
                  f"{sc['candidates']} candidates over gRPC: p50 {sc['p50_ms']:.1f} ms, p99 {sc['p99_ms']:.1f} ms")
    console.print(f"finished in {s['seconds']:.0f}s. Open the runs: "
                  f"[bold]mlflow ui --backend-store-uri {tracking_uri}[/bold]  (data in {work})")
