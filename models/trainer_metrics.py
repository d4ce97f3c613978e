"""Prometheus metrics of the online trainer (``--metrics-port``; off by default; rank 0 of a
data-parallel group serves them), on a registry of its own.

Everything is read from the trainer when Prometheus scrapes: the step pays nothing for it. The
window metrics are those the trainer computed at its last step (what it also logs to MLflow), so a
scrape never races the step that is updating the window.

=================================================  =========  =============================================
name                                               type       labels / meaning
=================================================  =========  =============================================
ctrstream_trainer_samples_total                    counter    samples learned, all ranks
ctrstream_trainer_duplicates_skipped_total         counter    sample ids already learned (replays)
ctrstream_trainer_seq_read_seconds_total           counter    time spent reading histories and batching
ctrstream_trainer_consumer_lag                     gauge      samples published and not consumed yet (NaN: unknown)
ctrstream_trainer_last_step_timestamp_seconds      gauge      Unix time of the last step (NaN: none yet)
ctrstream_trainer_last_step_age_seconds            gauge      seconds since then
ctrstream_trainer_model_steps_total                counter    model: steps taken
ctrstream_trainer_model_samples_total              counter    model: samples learned
ctrstream_trainer_model_train_seconds_total        counter    model: forward, backward and update time
ctrstream_trainer_model_window                     gauge      model, metric (auc/gauc/logloss/calibration/ctr/loss):
                                                              progressive metrics over the last ``window`` samples
ctrstream_trainer_model_registered_versions_total  counter    model: registry versions logged by this process
ctrstream_trainer_model_champion                   gauge      model, version: 1 for the champion being shadowed
ctrstream_trainer_info                             gauge      group, client, store (scheme), world_size: always 1
=================================================  =========  =============================================
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pipeline.metrics import HttpExposition, timestamp_and_age

if TYPE_CHECKING:
    from models.online import OnlineTrainer

__all__ = ["TrainerMetrics"]


class _TrainerCollector(Collector):
    def __init__(self, trainer: OnlineTrainer, clock: Callable[[], float]) -> None:
        self.trainer, self.clock = trainer, clock

    def collect(self) -> Iterator[Any]:
        t, now = self.trainer, self.clock()
        yield CounterMetricFamily("ctrstream_trainer_samples", "samples learned, all ranks", value=t.total_samples)
        yield CounterMetricFamily("ctrstream_trainer_duplicates_skipped", "sample ids already learned",
                                  value=t.duplicates)
        yield CounterMetricFamily("ctrstream_trainer_seq_read_seconds", "time reading histories and batching",
                                  value=t.data_s)
        yield GaugeMetricFamily("ctrstream_trainer_consumer_lag", "samples published and not consumed yet",
                                value=t.consumer_lag)
        yield from timestamp_and_age("ctrstream_trainer_last_step", "the last step", t.last_step_unix, now)
        steps = CounterMetricFamily("ctrstream_trainer_model_steps", "steps taken", labels=["model"])
        samples = CounterMetricFamily("ctrstream_trainer_model_samples", "samples learned", labels=["model"])
        train_s = CounterMetricFamily("ctrstream_trainer_model_train_seconds", "forward, backward and update time",
                                      labels=["model"])
        window = GaugeMetricFamily("ctrstream_trainer_model_window", "progressive metrics over the last window",
                                   labels=["model", "metric"])
        versions = CounterMetricFamily("ctrstream_trainer_model_registered_versions",
                                       "registry versions logged by this process", labels=["model"])
        champion = GaugeMetricFamily("ctrstream_trainer_model_champion", "1 for the champion being shadowed",
                                     labels=["model", "version"])
        for slot in list(t.slots):
            rep = slot.report
            if rep is None:
                continue
            steps.add_metric([slot.name], rep.steps)
            samples.add_metric([slot.name], rep.samples)
            train_s.add_metric([slot.name], slot.step_s)
            for metric, value in dict(slot.last_metrics).items():
                window.add_metric([slot.name, metric], value)
            versions.add_metric([slot.name], len(rep.versions))
            if slot.champion_version is not None:
                champion.add_metric([slot.name, str(slot.champion_version)], 1)
        yield from (steps, samples, train_s, window, versions, champion)
        s = t.s
        info = GaugeMetricFamily("ctrstream_trainer_info", "the trainer's configuration",
                                 labels=["group", "client", "store", "world_size"])
        info.add_metric([s.group_id, s.kafka_client, s.store.split("://", 1)[0], str(t.dist.world)], 1)
        yield info


class TrainerMetrics(HttpExposition):
    """All trainer metrics for one :class:`~models.online.OnlineTrainer`; :meth:`serve_http` exposes them."""

    def __init__(self, trainer: OnlineTrainer, registry: CollectorRegistry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(_TrainerCollector(trainer, clock))
