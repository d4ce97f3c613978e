"""The online trainer: learns from the ``samples`` stream, reports through MLflow, promotes by evidence.

For every mini-batch of samples:

1. duplicates (a ``sample_id`` already learned, e.g. after an upstream replay) are dropped;
2. each sample's history is read from the sequence store **as of its ``seq_pos``** (never later
   behaviors), once, and shared by every model trained in this process;
3. *progressive validation*: every model scores the batch before it learns from it (and so does
   the current champion snapshot, "shadow" scoring, so champion and challenger are compared on the
   very same out-of-sample predictions);
4. one optimiser step per model; metrics go to MLflow with ``step`` from a background thread.

Every ``checkpoint_every`` samples (and at exit) each model becomes a new registry version tagged
with its input offsets, sample count, window metrics and code version; alias ``challenger`` moves
to it, and ``champion`` moves only if the challenger's window AUC beats the champion's on the same
window by ``promotion_margin``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient

from models._window import MetricWindow
from models.features import FeatureSpec, build_batch
from models.registry import (
    CHAMPION,
    decide_promotion,
    load_registered_ranker,
    log_ranker_version,
    record_decision,
)
from models.tracking import RunTracker, default_tracking_uri
from pipeline.config import TrainerSettings
from pipeline.events import RawRecord
from pipeline.exceptions import ConfigError
from pipeline.kafka import make_assigned_consumer
from pipeline.state import open_store

__all__ = ["TrainerSettings", "OnlineTrainer", "run_trainer", "ModelReport"]

log = logging.getLogger(__name__)

#: Progressive predictions kept for the whole-run AUC in reports (older ones are dropped).
TOTAL_HISTORY = 2_000_000
STATE_FILE = "state.pt"

#: Recently learned sample ids remembered for de-duplication. Replays after a worker crash re-emit
#: at most one attribution window of samples, far fewer than this.
DEDUP_CAPACITY = 1_000_000


@dataclass
class ModelReport:
    preset: str
    registered_name: str
    samples: int = 0
    steps: int = 0
    auc: float = float("nan")  # progressive AUC over every sample seen
    logloss: float = float("nan")
    window_auc: float = float("nan")
    samples_per_s: float = 0.0
    versions: list[str] = field(default_factory=list)
    champion: str | None = None


@dataclass
class _Slot:
    preset: str
    name: str
    ranker: torch.nn.Module
    train: torch.nn.Module
    opt: torch.optim.Optimizer
    tracker: RunTracker
    window: MetricWindow
    all_preds: list[np.ndarray] = field(default_factory=list)
    all_labels: list[np.ndarray] = field(default_factory=list)
    champion: torch.nn.Module | None = None
    champion_version: str | None = None
    report: ModelReport | None = None
    step_s: float = 0.0
    registered_at: int = -1  # samples learned when the last registry version was logged


def _code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import version

    return f"ctrstream-{version('ctrstream')}"


class OnlineTrainer:
    def __init__(self, settings: TrainerSettings) -> None:
        from models import RankerTrain, build_ranker

        self.s = settings
        self.tracking_uri = settings.tracking_uri or default_tracking_uri()
        self.client = MlflowClient(self.tracking_uri)
        self.store = open_store(settings.store, readonly=True)
        self.code_version = _code_version()
        self.offsets: dict[tuple[str, int], int] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.duplicates = 0
        self.samples = 0
        self.consumer_lag = float("nan")  # samples not yet consumed (set by the run loop)
        self.data_s = 0.0
        self.slots: list[_Slot] = []
        torch.manual_seed(settings.seed)
        for preset in [m.strip() for m in settings.models.split(",") if m.strip()]:
            spec = FeatureSpec(seq_len=settings.short_len if preset == "din" else settings.seq_len,
                               item_buckets=settings.item_buckets, category_buckets=settings.category_buckets)
            ranker = build_ranker(preset, spec=spec)
            name = f"{settings.registered_prefix}{preset}"
            tracker = RunTracker(self.client, settings.experiment, run_name=f"{preset}-online")
            tracker.log_params({"preset": preset, "config": json.dumps(ranker.config.to_dict(), sort_keys=True),
                                "lr": settings.lr, "batch_size": settings.batch_size,
                                "samples_topic": settings.samples_topic, "code_version": self.code_version})
            slot = _Slot(preset, name, ranker, RankerTrain(ranker), torch.optim.Adam(ranker.parameters(), lr=settings.lr),
                         tracker, MetricWindow(settings.window), report=ModelReport(preset, name))
            self._load_champion(slot)
            self.slots.append(slot)
        self.read_len = max(s.ranker.config.features.seq_len for s in self.slots)
        self.state_path = Path(settings.checkpoint_dir) / STATE_FILE
        self.resumed = self._restore()

    # ---- crash-safe state -----------------------------------------------------------------------------
    def save_state(self) -> None:
        """Models, optimizers, windows, learned ids and consumed offsets, written atomically together."""
        state = {
            "presets": [s.preset for s in self.slots],
            "offsets": [[t, p, o] for (t, p), o in sorted(self.offsets.items())],
            "seen": list(self._seen),
            "samples": self.samples,
            "duplicates": self.duplicates,
            "slots": [{
                "model": s.ranker.state_dict(), "optimizer": s.opt.state_dict(), "window": s.window.state(),
                "steps": s.report.steps if s.report else 0, "samples": s.report.samples if s.report else 0,
                "versions": list(s.report.versions) if s.report else [], "step_s": s.step_s,
                "registered_at": s.registered_at,
                "preds": np.concatenate(s.all_preds).tolist() if s.all_preds else [],
                "labels": np.concatenate(s.all_labels).tolist() if s.all_labels else [],
            } for s in self.slots],
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)  # atomic: a crash leaves the old state or the new one

    def _restore(self) -> bool:
        if not self.state_path.exists():
            return False
        st = torch.load(self.state_path, weights_only=True)
        presets = [s.preset for s in self.slots]
        if st["presets"] != presets:
            raise ConfigError(f"checkpoint {self.state_path} holds models {st['presets']}, not {presets}; "
                              "use another --checkpoint-dir or the same --models")
        self.offsets = {(t, int(p)): int(o) for t, p, o in st["offsets"]}
        self._seen = OrderedDict((sid, None) for sid in st["seen"])
        self.samples, self.duplicates = int(st["samples"]), int(st["duplicates"])
        for slot, ss in zip(self.slots, st["slots"], strict=True):
            slot.ranker.load_state_dict(ss["model"])
            slot.opt.load_state_dict(ss["optimizer"])
            slot.window.load_state(ss["window"])
            slot.step_s = float(ss["step_s"])
            slot.registered_at = int(ss["registered_at"])
            if ss["preds"]:
                slot.all_preds.append(np.asarray(ss["preds"], dtype=np.float64))
                slot.all_labels.append(np.asarray(ss["labels"], dtype=np.float64))
            assert slot.report is not None
            slot.report.steps, slot.report.samples = int(ss["steps"]), int(ss["samples"])
            slot.report.versions = list(ss["versions"])
        log.info("resumed from %s: %d samples learned, offsets %s", self.state_path, self.samples, self.offsets)
        return True

    @property
    def learned_ids(self) -> list[str]:
        return list(self._seen)

    def _load_champion(self, slot: _Slot) -> None:
        try:
            lm = load_registered_ranker(slot.name, CHAMPION, self.tracking_uri)
        except Exception:  # noqa: BLE001 - no registered model or no champion yet
            return
        if lm.ranker.config.to_dict() != slot.ranker.config.to_dict():
            log.info("champion of %s has another config; comparing anyway on the same window", slot.name)
        slot.champion, slot.champion_version = lm.ranker, lm.version

    # ---- one step ----------------------------------------------------------------------------------
    def _parse(self, records: list[RawRecord]) -> list[dict[str, Any]]:
        out = []
        for r in records:
            key = (r.topic, r.partition)
            self.offsets[key] = max(self.offsets.get(key, 0), r.offset + 1)
            try:
                s = json.loads(r.value or b"")
                sid = s["sample_id"]
            except (ValueError, KeyError, TypeError):
                log.warning("skipping malformed sample at %s/%d@%d", r.topic, r.partition, r.offset)
                continue
            if sid in self._seen:
                self.duplicates += 1
                continue
            self._seen[sid] = None
            if len(self._seen) > DEDUP_CAPACITY:
                self._seen.popitem(last=False)
            out.append(s)
        return out

    def _wait_for_store(self, samples: list[dict[str, Any]]) -> None:
        deadline = time.monotonic() + self.s.store_wait_s
        for smp in samples:
            while self.store.length(int(smp["user_hash"])) < int(smp["seq_pos"]):
                if time.monotonic() > deadline:
                    log.warning("store behind sample %s (seq_pos %s); reading what is there",
                                smp["sample_id"], smp["seq_pos"])
                    return
                time.sleep(0.05)

    def learn(self, samples: list[dict[str, Any]]) -> None:
        if not samples:
            return
        t0 = time.perf_counter()
        self._wait_for_store(samples)
        users = [int(s["user_hash"]) for s in samples]
        hists = self.store.read_many(users, [int(s["seq_pos"]) for s in samples], self.read_len)
        items = np.array([int(s["item_hash"]) for s in samples], dtype=np.int64)
        cats = np.array([int(s["category_hash"]) for s in samples], dtype=np.int64)
        labels = torch.tensor([float(s["label"]) for s in samples])
        batches: dict[FeatureSpec, Any] = {}
        for slot in self.slots:
            spec = slot.ranker.config.features
            if spec not in batches:
                batches[spec] = build_batch(hists, items, cats, spec)
        self.data_s += time.perf_counter() - t0
        self.samples += len(samples)
        user_arr = np.asarray(users, dtype=np.int64)
        for slot in self.slots:
            batch = batches[slot.ranker.config.features]
            t1 = time.perf_counter()
            if slot.champion is not None:
                with torch.no_grad():
                    champ = torch.sigmoid(slot.champion(batch)).numpy()
            else:
                champ = None
            slot.ranker.train()
            loss, (_, logits, _) = slot.train(batch, labels)
            # Progressive validation: the training forward's logits are computed *before* this
            # batch's update, so they are out-of-sample predictions (one forward saved per step).
            pred = torch.sigmoid(logits).numpy()
            slot.opt.zero_grad(set_to_none=True)
            loss.backward()
            slot.opt.step()
            slot.step_s += time.perf_counter() - t1
            y = labels.numpy()
            slot.window.add(pred, y, user_arr, champ)
            slot.all_preds.append(pred)
            slot.all_labels.append(y)
            while sum(len(a) for a in slot.all_preds) > TOTAL_HISTORY:
                slot.all_preds.pop(0)
                slot.all_labels.pop(0)
            rep = slot.report
            assert rep is not None
            rep.samples += len(samples)
            rep.steps += 1
            m = slot.window.metrics()
            m.update({"loss": float(loss.detach()), "samples_per_s": rep.samples / max(slot.step_s, 1e-9),
                      "seq_read_ms": 1000 * self.data_s / max(rep.steps, 1), "consumer_lag": self.consumer_lag,
                      "duplicates_skipped": float(self.duplicates)})
            slot.tracker.log_metrics(m, step=rep.samples)
        before = self.samples - len(samples)
        if self.samples // self.s.checkpoint_every != before // self.s.checkpoint_every:
            self.checkpoint()
        if self.samples // self.s.state_every != before // self.s.state_every:
            self.save_state()

    # ---- registry -----------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        for slot in self.slots:
            rep = slot.report
            assert rep is not None
            if rep.samples == 0 or rep.samples == slot.registered_at:
                continue  # nothing new since the last version
            slot.registered_at = rep.samples
            wm = slot.window.metrics()
            tags = {"preset": slot.preset, "samples": rep.samples, "code_version": self.code_version,
                    "input_offsets": json.dumps({f"{t}/{p}": o for (t, p), o in sorted(self.offsets.items())}),
                    **{f"window.{k}": f"{v:.6f}" for k, v in wm.items()}}
            version = log_ranker_version(self.client, slot.tracker.run_id, slot.ranker, slot.name, tags)
            rep.versions.append(version)
            chall, champ, n = slot.window.compare()
            decision = decide_promotion(chall, champ if slot.champion is not None else None,
                                        self.s.promotion_margin)
            record_decision(self.client, slot.name, version, decision, {"samples": n})
            if decision.promote:
                slot.champion = copy.deepcopy(slot.ranker).eval()
                slot.champion_version = version
                slot.window.reset_champion()
            rep.champion = slot.champion_version
            log.info("%s v%s: %s (%s)", slot.name, version, "promoted" if decision.promote else "kept",
                     decision.reason)

    def finish(self, failed: bool = False) -> list[ModelReport]:
        from models.metrics import auc, logloss

        reports = []
        for slot in self.slots:
            rep = slot.report
            assert rep is not None
            if slot.all_preds:
                p = np.concatenate(slot.all_preds)
                y = np.concatenate(slot.all_labels)
                rep.auc = auc(p, y)
                rep.logloss = logloss(p, y)
                slot.tracker.log_metrics({"progressive_auc_total": rep.auc, "progressive_logloss_total": rep.logloss},
                                         step=rep.samples)
            rep.window_auc = slot.window.metrics().get("auc", float("nan"))
            rep.samples_per_s = rep.samples / max(slot.step_s, 1e-9)
            slot.tracker.finish(failed)
            reports.append(rep)
        self.store.close()
        return reports


class _LagProbe:
    """Consumer lag = end offsets − consumed offsets, from a group-less consumer (every few steps)."""

    EVERY = 20  # steps between probes: one metadata round trip each

    def __init__(self, settings: TrainerSettings) -> None:
        self.s = settings
        self._c: Any = None
        self.steps = 0
        self.last: float = float("nan")

    def __call__(self, offsets: dict[tuple[str, int], int]) -> float:
        self.steps += 1
        if self.s.kafka_client != "kafka-python" or (self.steps - 1) % self.EVERY:
            return self.last
        try:
            from kafka import KafkaConsumer, TopicPartition

            if self._c is None:
                self._c = KafkaConsumer(bootstrap_servers=self.s.bootstrap_servers, enable_auto_commit=False)
            tps = [TopicPartition(t, p) for (t, p) in offsets]
            ends = self._c.end_offsets(tps)
            self.last = float(sum(max(0, ends[tp] - offsets[(tp.topic, tp.partition)]) for tp in tps))
        except Exception as e:  # noqa: BLE001 - a metric must never stop training
            log.debug("lag probe failed: %s", e)
        return self.last

    def close(self) -> None:
        if self._c is not None:
            self._c.close()


def run_trainer(settings: TrainerSettings, *, stop: threading.Event | None = None,
                on_step: Callable[[OnlineTrainer], None] | None = None,
                install_signals: bool = True) -> list[ModelReport]:
    """Consume samples until stopped or idle; checkpoint at the end; return per-model reports."""
    stop = stop or threading.Event()
    if install_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    torch.set_num_threads(max(1, torch.get_num_threads()))
    trainer = OnlineTrainer(settings)
    consumer = make_assigned_consumer(settings.kafka_client, settings.bootstrap_servers, [settings.samples_topic],
                                      settings.group_id, max_poll_records=settings.batch_size,
                                      start=dict(trainer.offsets) if trainer.resumed else None)
    last = time.monotonic()
    failed = False
    buf: deque[RawRecord] = deque()
    lag = _LagProbe(settings)
    try:
        while not stop.is_set():
            recs = consumer.poll_batch(settings.batch_size, 500)
            buf.extend(recs)
            if len(buf) >= settings.batch_size or (buf and not recs):
                take = [buf.popleft() for _ in range(min(settings.batch_size, len(buf)))]
                trainer.consumer_lag = lag(trainer.offsets)
                trainer.learn(trainer._parse(take))  # noqa: SLF001
                consumer.commit(dict(trainer.offsets))
                last = time.monotonic()
                if on_step:
                    on_step(trainer)
            elif not recs and settings.exit_when_idle and time.monotonic() - last > settings.exit_when_idle:
                break
        trainer.checkpoint()
        trainer.save_state()
    except BaseException:
        failed = True
        raise
    finally:
        consumer.close()
        lag.close()
        reports = trainer.finish(failed)
    return reports
