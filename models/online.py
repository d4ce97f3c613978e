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

With ``world_size > 1`` the same loop runs data-parallel (:mod:`models.distributed`): each rank
learns from its own partitions, the models are wrapped in DistributedDataParallel, the ranks agree
on every step with one collective, and rank 0 alone talks to MLflow, over metrics gathered from
every rank.
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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from models._window import MetricWindow
from models.distributed import (
    Agreement,
    DistContext,
    common_generation,
    init_distributed,
    list_generations,
    loss_weight,
    placeholder_batch,
    snapshot_buffers,
    state_digest,
    state_file,
    sync_buffers,
)
from models.features import FeatureSpec, build_batch
from models.tracking import RunTracker, default_tracking_uri
from pipeline.config import TrainerSettings
from pipeline.events import RawRecord
from pipeline.exceptions import ConfigError
from pipeline.kafka import make_assigned_consumer
from pipeline.state import open_store

if TYPE_CHECKING:  # MLflow and the registry are imported where used: ranks > 0 never load them
    from mlflow import MlflowClient

    from models.ranker import Ranker

__all__ = ["TrainerSettings", "OnlineTrainer", "run_trainer", "ModelReport"]

log = logging.getLogger(__name__)

#: Progressive predictions kept for the whole-run AUC in reports (older ones are dropped).
TOTAL_HISTORY = 2_000_000
STATE_FILE = "state.pt"

#: Recently learned sample ids remembered for de-duplication. Replays after a worker crash re-emit
#: at most one attribution window of samples, far fewer than this.
DEDUP_CAPACITY = 1_000_000

#: Poll timeout while waiting for samples (ms), and while another rank is busy training: a rank
#: without data must not hold the others' next step back by a whole idle poll.
POLL_MS = 500
BUSY_POLL_MS = 20


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
    ranker: Ranker
    train: torch.nn.Module
    opt: torch.optim.Optimizer
    tracker: RunTracker | None  # rank 0 only: the other ranks never talk to MLflow
    window: MetricWindow
    all_preds: list[np.ndarray] = field(default_factory=list)
    all_labels: list[np.ndarray] = field(default_factory=list)
    champion: Ranker | None = None
    champion_version: str | None = None
    report: ModelReport | None = None
    step_s: float = 0.0
    registered_at: int = -1  # samples learned when the last registry version was logged
    step_module: torch.nn.Module | None = None  # ``train`` itself, or ``train`` in DDP (world > 1)
    #: the window's metrics and the step's loss as last computed (rank 0; read by models/trainer_metrics.py)
    last_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def stepper(self) -> torch.nn.Module:
        return self.step_module if self.step_module is not None else self.train


def _write_atomic(path: Path, state: dict[str, Any]) -> None:
    """temp file, fsync, rename: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _loss_state(train: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in train.state_dict().items() if not k.startswith("ranker.")}


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
    """Models, optimizers, metric windows and consumed offsets of one trainer process (one rank).

    ``samples`` counts what this rank learned; ``total_samples`` what all ranks learned together
    (the same number with one process), which drives checkpoints and the reported sample counts.
    """

    def __init__(self, settings: TrainerSettings, dist: DistContext | None = None) -> None:
        from models import RankerTrain, build_ranker

        self.s = settings
        self.dist = dist or DistContext()
        self.device = self.dist.device
        self.tracking_uri = settings.tracking_uri or default_tracking_uri()
        # Rank 0 alone talks to MLflow (the others never even open the store: a fresh SQLite store
        # is created by its first client, and two creating it at once collide).
        self.client: MlflowClient | None = None
        if self.dist.is_root:
            from mlflow import MlflowClient

            self.client = MlflowClient(self.tracking_uri)
        self.store = open_store(settings.store, readonly=True)
        self.code_version = _code_version()
        self.offsets: dict[tuple[str, int], int] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.duplicates = 0
        self.samples = 0
        self.total_samples = 0
        self.placeholder_steps = 0  # steps this rank took with no samples of its own (weight 0)
        self.generation = 0  # crash-safe state generation (data parallel)
        self.consumer_lag = float("nan")  # samples not yet consumed (set by the run loop)
        self.data_s = 0.0
        self.last_step_unix: float | None = None  # wall-clock time of the last step with samples
        self.slots: list[_Slot] = []
        torch.manual_seed(settings.seed)
        for preset in [m.strip() for m in settings.models.split(",") if m.strip()]:
            spec = FeatureSpec(seq_len=settings.short_len if preset == "din" else settings.seq_len,
                               item_buckets=settings.item_buckets, category_buckets=settings.category_buckets)
            ranker = build_ranker(preset, spec=spec)
            train = RankerTrain(ranker).to(self.device)
            name = f"{settings.registered_prefix}{preset}"
            tracker = None
            if self.client is not None:
                tracker = RunTracker(self.client, settings.experiment, run_name=f"{preset}-online")
                tracker.log_params({"preset": preset, "config": json.dumps(ranker.config.to_dict(), sort_keys=True),
                                    "lr": settings.lr, "batch_size": settings.batch_size,
                                    "world_size": self.dist.world, "samples_topic": settings.samples_topic,
                                    "code_version": self.code_version})
            slot = _Slot(preset, name, ranker, train, torch.optim.Adam(ranker.parameters(), lr=settings.lr),
                         tracker, MetricWindow(settings.window), report=ModelReport(preset, name))
            self._load_champion(slot)
            self.slots.append(slot)
        self.read_len = max(s.ranker.config.features.seq_len for s in self.slots)
        self.state_dir = Path(settings.checkpoint_dir)
        self.state_path = self.state_dir / STATE_FILE
        self.resumed = self._restore_ranks() if self.dist.enabled else self._restore()
        for slot in self.slots:  # after the restore: every rank starts DDP from the same weights
            slot.step_module = self.dist.wrap(slot.train)

    # ---- crash-safe state -----------------------------------------------------------------------------
    def _slot_states(self) -> list[dict[str, Any]]:
        return [{
            "model": s.ranker.state_dict(), "optimizer": s.opt.state_dict(), "window": s.window.state(),
            "loss_state": _loss_state(s.train),  # the loss's own buffers (DIN's MBA-L2 id counts)
            "steps": s.report.steps if s.report else 0, "samples": s.report.samples if s.report else 0,
            "versions": list(s.report.versions) if s.report else [], "step_s": s.step_s,
            "registered_at": s.registered_at,
            "preds": np.concatenate(s.all_preds).tolist() if s.all_preds else [],
            "labels": np.concatenate(s.all_labels).tolist() if s.all_labels else [],
        } for s in self.slots]

    def save_state(self) -> None:
        """Models, optimizers, windows, learned ids and consumed offsets, written atomically together.

        Data parallel (a collective: every rank calls it at the same step): each rank writes its own
        offsets, learned ids and counters, rank 0 also the models, optimizers and windows, as
        generation ``g``; older generations are deleted only after every rank has written ``g``.
        """
        state: dict[str, Any] = {
            "presets": [s.preset for s in self.slots],
            "offsets": [[t, p, o] for (t, p), o in sorted(self.offsets.items())],
            "seen": list(self._seen),
            "samples": self.samples,
            "duplicates": self.duplicates,
        }
        if not self.dist.enabled:
            state["slots"] = self._slot_states()
            _write_atomic(self.state_path, state)
            return
        self.generation += 1
        state.update({"rank": self.dist.rank, "world_size": self.dist.world, "generation": self.generation,
                      "total_samples": self.total_samples, "placeholder_steps": self.placeholder_steps,
                      "digests": [state_digest(s.train.state_dict()) for s in self.slots]})
        if self.dist.is_root:
            state["slots"] = self._slot_states()
        _write_atomic(state_file(self.state_dir, self.dist.rank, self.dist.world, self.generation), state)
        self.dist.barrier()  # generation g is on every rank's disk: older ones may go
        for g in list_generations(self.state_dir, self.dist.rank, self.dist.world)[0]:
            if g < self.generation:
                state_file(self.state_dir, self.dist.rank, self.dist.world, g).unlink(missing_ok=True)

    def _restore(self) -> bool:
        if not self.state_path.exists():
            return False
        st = torch.load(self.state_path, weights_only=True)
        presets = [s.preset for s in self.slots]
        if st["presets"] != presets:
            raise ConfigError(f"checkpoint {self.state_path} holds models {st['presets']}, not {presets}; "
                              "use another --checkpoint-dir or the same --models")
        self._load_common(st)
        self.total_samples = self.samples
        self._load_slots(st["slots"])
        log.info("resumed from %s: %d samples learned, offsets %s", self.state_path, self.samples, self.offsets)
        return True

    def _restore_ranks(self) -> bool:
        """Data parallel: resume every rank from the newest generation all ranks hold (a collective)."""
        gens, other_worlds = list_generations(self.state_dir, self.dist.rank, self.dist.world)
        everyone = self.dist.all_gather((gens, other_worlds))
        gen = common_generation([g for g, _ in everyone])
        if gen is None:
            others = sorted({w for _, ws in everyone for w in ws})
            if others:
                raise ConfigError(f"{self.state_dir} holds trainer state of world size {others}, not "
                                  f"{self.dist.world}; resume with the same --world-size or a fresh --checkpoint-dir")
            return False
        st = torch.load(state_file(self.state_dir, self.dist.rank, self.dist.world, gen), weights_only=True)
        if st["presets"] != [s.preset for s in self.slots]:
            raise ConfigError(f"checkpoint in {self.state_dir} holds models {st['presets']}; use another "
                              "--checkpoint-dir or the same --models")
        self._load_common(st)
        self.generation, self.total_samples = gen, int(st["total_samples"])
        self.placeholder_steps = int(st["placeholder_steps"])
        self._load_slots(self.dist.broadcast(st.get("slots")))  # rank 0's models and optimizers
        log.info("rank %d resumed generation %d: %d samples learned here, %d by all ranks", self.dist.rank, gen,
                 self.samples, self.total_samples)
        return True

    def _load_common(self, st: dict[str, Any]) -> None:
        self.offsets = {(t, int(p)): int(o) for t, p, o in st["offsets"]}
        self._seen = OrderedDict((sid, None) for sid in st["seen"])
        self.samples, self.duplicates = int(st["samples"]), int(st["duplicates"])

    def _load_slots(self, slot_states: list[dict[str, Any]]) -> None:
        for slot, ss in zip(self.slots, slot_states, strict=True):
            slot.ranker.load_state_dict(ss["model"])
            if ss.get("loss_state"):  # absent in states written before it was saved
                slot.train.load_state_dict({**slot.train.state_dict(), **ss["loss_state"]})
            slot.opt.load_state_dict(ss["optimizer"])
            slot.registered_at = int(ss["registered_at"])
            assert slot.report is not None
            slot.report.steps, slot.report.samples = int(ss["steps"]), int(ss["samples"])
            slot.report.versions = list(ss["versions"])
            if not self.dist.is_root:
                continue  # metric windows, prediction history and step time are rank 0's
            slot.window.load_state(ss["window"])
            slot.step_s = float(ss["step_s"])
            if ss["preds"]:
                slot.all_preds.append(np.asarray(ss["preds"], dtype=np.float64))
                slot.all_labels.append(np.asarray(ss["labels"], dtype=np.float64))

    @property
    def learned_ids(self) -> list[str]:
        return list(self._seen)

    def _load_champion(self, slot: _Slot) -> None:
        """The registry's champion for shadow scoring: rank 0 reads it, the other ranks get a copy
        (config + weights) from rank 0, so every rank scores with the same snapshot."""
        found: tuple[dict[str, Any], dict[str, torch.Tensor], str] | None = None
        if self.dist.is_root:
            from models.registry import CHAMPION, load_registered_ranker

            try:
                lm = load_registered_ranker(slot.name, CHAMPION, self.tracking_uri)
                found = (lm.ranker.config.to_dict(), lm.ranker.state_dict(), lm.version)
            except Exception:  # noqa: BLE001 - no registered model or no champion yet
                found = None
        found = self.dist.broadcast(found)
        if found is None:
            return
        from models import Ranker, RankerConfig

        config, weights, version = found
        if config != slot.ranker.config.to_dict():
            log.info("champion of %s has another config; comparing anyway on the same window", slot.name)
        champion = Ranker(RankerConfig.from_dict(config))
        champion.load_state_dict(weights)
        slot.champion, slot.champion_version = champion.to(self.device).eval(), version

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

    def learn(self, samples: list[dict[str, Any]], counts: tuple[int, ...] | None = None) -> None:
        """One step of every model on ``samples`` (this rank's share of the step).

        ``counts``: the samples every rank holds for this step (:meth:`DistContext.agree`); with one
        process, just ``len(samples)``. Data parallel, every rank calls this in the same step, a rank
        with no samples on a placeholder batch with loss weight 0.
        """
        counts = counts if counts is not None else (len(samples),)
        total = sum(counts)
        if total == 0:
            return
        t0 = time.perf_counter()
        batches: dict[FeatureSpec, Any] = {}
        if samples:
            self._wait_for_store(samples)
            users = [int(s["user_hash"]) for s in samples]
            hists = self.store.read_many(users, [int(s["seq_pos"]) for s in samples], self.read_len)
            items = np.array([int(s["item_hash"]) for s in samples], dtype=np.int64)
            cats = np.array([int(s["category_hash"]) for s in samples], dtype=np.int64)
            labels = torch.tensor([float(s["label"]) for s in samples])
            for slot in self.slots:
                spec = slot.ranker.config.features
                if spec not in batches:
                    batches[spec] = build_batch(hists, items, cats, spec)
        else:
            self.placeholder_steps += 1
            users, labels = [], torch.zeros(1)
            for slot in self.slots:
                spec = slot.ranker.config.features
                batches.setdefault(spec, placeholder_batch(spec))
        self.data_s += time.perf_counter() - t0
        self.samples += len(samples)
        self.total_samples += total
        self.last_step_unix = time.time()
        user_arr = np.asarray(users, dtype=np.int64)
        y = labels.numpy()
        weight = loss_weight(counts, self.dist.rank)
        labels = labels.to(self.device)
        shares: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, float] | None] = []
        for slot in self.slots:
            batch = batches[slot.ranker.config.features].to(self.device)
            t1 = time.perf_counter()
            champ = None
            if slot.champion is not None and samples:
                with torch.no_grad():
                    champ = torch.sigmoid(slot.champion(batch)).cpu().numpy()
            slot.ranker.train()
            before = snapshot_buffers(slot.train) if self.dist.enabled else []
            loss, (_, logits, _) = slot.stepper(batch, labels)
            # Progressive validation: the training forward's logits are computed *before* this
            # batch's update, so they are out-of-sample predictions (one forward saved per step).
            pred = torch.sigmoid(logits).cpu().numpy()
            slot.opt.zero_grad(set_to_none=True)
            # Data parallel: DDP averages gradients over the ranks; the weight makes that average the
            # gradient of the mean loss over all ranks' samples (0 for a placeholder batch).
            (loss * weight if self.dist.enabled else loss).backward()
            slot.opt.step()
            sync_buffers(self.dist, slot.train, before, len(samples), total)
            slot.step_s += time.perf_counter() - t1
            shares.append((pred, y, user_arr, champ, float(loss.detach()) * len(samples)) if samples else None)
        gathered = self.dist.gather(shares)  # rank 0: every rank's predictions, for metrics over the union
        for i, slot in enumerate(self.slots):
            rep = slot.report
            assert rep is not None
            rep.samples += total
            rep.steps += 1
            if gathered is not None:
                self._record(slot, [g[i] for g in gathered if g[i] is not None], total)
        before_total = self.total_samples - total
        if self.total_samples // self.s.checkpoint_every != before_total // self.s.checkpoint_every:
            self.checkpoint()
        if self.total_samples // self.s.state_every != before_total // self.s.state_every:
            self.save_state()

    def _record(self, slot: _Slot, shares: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, float]],
                total: int) -> None:
        """Progressive predictions of one step (every rank's share, in rank order) into the metric
        window and MLflow (rank 0)."""
        rep = slot.report
        assert rep is not None
        for pred, y, users, champ, _ in shares:
            slot.window.add(pred, y, users, champ)
            slot.all_preds.append(pred)
            slot.all_labels.append(y)
        while sum(len(a) for a in slot.all_preds) > TOTAL_HISTORY:
            slot.all_preds.pop(0)
            slot.all_labels.pop(0)
        if slot.tracker is None:
            return
        m = slot.window.metrics()
        slot.last_metrics = {**m, "loss": sum(sh[4] for sh in shares) / max(1, total)}
        m.update({"loss": slot.last_metrics["loss"],
                  "samples_per_s": rep.samples / max(slot.step_s, 1e-9),
                  "seq_read_ms": 1000 * self.data_s / max(rep.steps, 1), "consumer_lag": self.consumer_lag,
                  "duplicates_skipped": float(self.duplicates)})
        slot.tracker.log_metrics(m, step=rep.samples)

    # ---- registry -----------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """A registry version of every model with new samples, and the promotion decision.

        Data parallel (a collective): the ranks first compare weight digests (a divergence is a bug
        and stops training), rank 0 registers the versions, tagged with every rank's offsets, and
        decides; its decisions are broadcast so every rank's champion snapshot stays the same.
        """
        due = [s for s in self.slots if s.report is not None and s.report.samples
               and s.report.samples != s.registered_at]  # nothing new since the last version otherwise
        if self.dist.enabled:
            self._check_identical_weights()
        offsets = self.dist.gather(dict(self.offsets))
        decisions: list[tuple[bool, str]] = []
        if self.dist.is_root:
            assert offsets is not None
            merged = {k: v for part in offsets for k, v in part.items()}
            decisions = [self._register(slot, merged) for slot in due]
        decisions = self.dist.broadcast(decisions)
        for slot, (promote, version) in zip(due, decisions, strict=True):
            rep = slot.report
            assert rep is not None
            slot.registered_at = rep.samples
            if not self.dist.is_root:
                rep.versions.append(version)
            if promote:
                slot.champion = copy.deepcopy(slot.ranker).eval()
                slot.champion_version = version
                slot.window.reset_champion()
            rep.champion = slot.champion_version

    def _register(self, slot: _Slot, offsets: dict[tuple[str, int], int]) -> tuple[bool, str]:
        from models.registry import decide_promotion, log_ranker_version, record_decision

        rep = slot.report
        assert rep is not None and slot.tracker is not None and self.client is not None
        wm = slot.window.metrics()
        tags = {"preset": slot.preset, "samples": rep.samples, "code_version": self.code_version,
                "world_size": self.dist.world,
                "input_offsets": json.dumps({f"{t}/{p}": o for (t, p), o in sorted(offsets.items())}),
                **{f"window.{k}": f"{v:.6f}" for k, v in wm.items()}}
        version = log_ranker_version(self.client, slot.tracker.run_id, slot.ranker, slot.name, tags)
        rep.versions.append(version)
        chall, champ, n = slot.window.compare()
        decision = decide_promotion(chall, champ if slot.champion is not None else None, self.s.promotion_margin)
        record_decision(self.client, slot.name, version, decision, {"samples": n})
        log.info("%s v%s: %s (%s)", slot.name, version, "promoted" if decision.promote else "kept", decision.reason)
        return decision.promote, version

    def _check_identical_weights(self) -> None:
        digests = self.dist.all_gather([state_digest(s.train.state_dict()) for s in self.slots])
        for slot, per_rank in zip(self.slots, zip(*digests, strict=True), strict=True):
            if len(set(per_rank)) > 1:
                raise RuntimeError(f"data-parallel ranks hold different weights for {slot.name} "
                                   f"(digests by rank: {[d[:12] for d in per_rank]}): a synchronisation bug")

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
            if slot.all_preds and slot.tracker is not None:
                slot.tracker.log_metrics({"progressive_auc_total": rep.auc, "progressive_logloss_total": rep.logloss},
                                         step=rep.samples)
            rep.window_auc = slot.window.metrics().get("auc", float("nan"))
            rep.samples_per_s = rep.samples / max(slot.step_s, 1e-9)
            if slot.tracker is not None:
                slot.tracker.finish(failed)
            reports.append(rep)
        self.store.close()
        return reports


class _LagProbe:
    """Consumer lag = end offsets − consumed offsets, from a group-less consumer of the trainer's own
    client (every few steps). The embedded broker (Tansu) answers "latest" with the offset after the
    first record of the last batch, so there the lag reads low by up to a batch; a Kafka broker's is exact."""

    EVERY = 20  # steps between probes: one metadata round trip each

    def __init__(self, settings: TrainerSettings) -> None:
        self.s = settings
        self._c: Any = None
        self.steps = 0
        self.last: float = float("nan")

    def __call__(self, offsets: dict[tuple[str, int], int]) -> float:
        self.steps += 1
        if (self.steps - 1) % self.EVERY or not offsets:
            return self.last
        try:
            ends = self._end_offsets(list(offsets))
            self.last = float(sum(max(0, ends[tp] - off) for tp, off in offsets.items()))
        except Exception as e:  # noqa: BLE001 - a metric must never stop training
            log.debug("lag probe failed: %s", e)
        return self.last

    def _end_offsets(self, tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
        if self.s.kafka_client == "confluent":
            import confluent_kafka as ck

            if self._c is None:
                self._c = ck.Consumer({"bootstrap.servers": self.s.bootstrap_servers, "enable.auto.commit": False,
                                       "group.id": f"{self.s.group_id}-lag-probe", "log_level": 3})
            return {tp: int(self._c.get_watermark_offsets(ck.TopicPartition(*tp), timeout=5)[1]) for tp in tps}
        from kafka import KafkaConsumer, TopicPartition

        if self._c is None:
            self._c = KafkaConsumer(bootstrap_servers=self.s.bootstrap_servers, enable_auto_commit=False)
        ends = self._c.end_offsets([TopicPartition(t, p) for t, p in tps])
        return {(tp.topic, tp.partition): int(off) for tp, off in ends.items()}

    def close(self) -> None:
        if self._c is not None:
            self._c.close()


def run_trainer(settings: TrainerSettings, *, stop: threading.Event | None = None,
                on_step: Callable[[OnlineTrainer], None] | None = None,
                install_signals: bool = True) -> list[ModelReport]:
    """Consume samples until stopped or idle; checkpoint at the end; return per-model reports.

    With ``settings.world_size > 1`` this process is one rank of a data-parallel group: it joins the
    process group first, consumes only its partitions, and every loop iteration starts with one
    collective in which the ranks agree on the step (:meth:`DistContext.agree`): a SIGTERM on any
    rank stops all of them after the current step, and they exit on idle only when all are idle.
    """
    stop = stop or threading.Event()
    if install_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ctx = init_distributed(settings)
    try:
        return _consume(settings, ctx, stop, on_step)
    finally:
        ctx.close()


def _consume(settings: TrainerSettings, ctx: DistContext, stop: threading.Event,
             on_step: Callable[[OnlineTrainer], None] | None) -> list[ModelReport]:
    trainer = OnlineTrainer(settings, ctx)
    failed = False
    consumer: Any = None
    lag = _LagProbe(settings)
    metrics: Any = None
    try:
        if settings.metrics_port is not None and ctx.is_root:  # one endpoint per group: rank 0's
            from models.trainer_metrics import TrainerMetrics

            metrics = TrainerMetrics(trainer)
            metrics.start(settings.metrics_port, settings.metrics_host)
        consumer = make_assigned_consumer(settings.kafka_client, settings.bootstrap_servers,
                                          [settings.samples_topic], settings.group_id, rank=ctx.rank,
                                          world=ctx.world, max_poll_records=settings.batch_size,
                                          start=dict(trainer.offsets) if trainer.resumed else None)
        last = time.monotonic()
        buf: deque[RawRecord] = deque()
        busy = False  # the last step had samples (on some rank)
        while True:
            recs: list[RawRecord] = []
            take: list[RawRecord] = []
            if not stop.is_set():  # stopping: poll nothing more, finish what was taken
                recs = consumer.poll_batch(settings.batch_size, BUSY_POLL_MS if busy and ctx.enabled else POLL_MS)
                buf.extend(recs)
                if len(buf) >= settings.batch_size or (buf and not recs):
                    take = [buf.popleft() for _ in range(min(settings.batch_size, len(buf)))]
            if take:
                trainer.consumer_lag = lag(trainer.offsets)
            samples = trainer._parse(take)  # noqa: SLF001
            idle = (not buf and not recs and not take and settings.exit_when_idle is not None
                    and time.monotonic() - last > settings.exit_when_idle)
            agreed: Agreement = ctx.agree(len(samples), stop.is_set(), idle, lag.last)
            busy = agreed.total > 0
            if busy:
                if ctx.enabled:
                    trainer.consumer_lag = agreed.lag
                trainer.learn(samples, agreed.counts)
                last = time.monotonic()
                if on_step:
                    on_step(trainer)
            if take:
                consumer.commit(dict(trainer.offsets))
            if agreed.stop or agreed.idle:
                break
        trainer.checkpoint()
        trainer.save_state()
    except BaseException:
        failed = True
        raise
    finally:
        if metrics is not None:
            metrics.close()
        if consumer is not None:
            consumer.close()
        lag.close()
        reports = trainer.finish(failed)
    return reports
