"""Prometheus metrics of the scorer, on a registry of its own (several servers can share a process).

=================================================  =========  ==============================
name                                               type       labels
=================================================  =========  ==============================
ctrstream_scorer_request_seconds                   histogram  method, code
ctrstream_scorer_candidates_per_request            histogram
ctrstream_scorer_history_length                    histogram
ctrstream_scorer_encoding_cache_total              counter    outcome (hit/extend/miss/empty/none)
ctrstream_scorer_encoding_cache_hit_ratio          gauge      (hit+extend+empty)/all since start
ctrstream_scorer_encoding_cache_bytes              gauge
ctrstream_scorer_inflight_requests                 gauge
ctrstream_scorer_model_info                        gauge      name, version (1 for the served one)
ctrstream_scorer_model_age_seconds                 gauge      since the version was created
ctrstream_scorer_model_reloads_total               counter    result (ok/failed)
ctrstream_scorer_reference_kernels                 gauge      1 = torch reference ops (no Triton)
=================================================  =========  ==============================
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pipeline.metrics import HttpExposition
from serving.scorer import CacheOutcome, LoadedModel, ScoreResult

__all__ = ["ScorerMetrics"]

_LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0)
_CANDIDATE_BUCKETS = (1, 10, 50, 100, 200, 500, 1000, 2000, 5000)
_LENGTH_BUCKETS = (0, 10, 100, 1000, 5000, 10_000, 50_000, 100_000)


class ScorerMetrics(HttpExposition):
    """All scorer metrics. ``model_age`` is read lazily (at scrape time) from ``current_model``."""

    def __init__(self, current_model: Callable[[], LoadedModel | None],
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.latency = Histogram("ctrstream_scorer_request_seconds", "RPC latency inside the server",
                                 ["method", "code"], buckets=_LATENCY_BUCKETS, registry=r)
        self.candidates = Histogram("ctrstream_scorer_candidates_per_request", "candidates per Score request",
                                    buckets=_CANDIDATE_BUCKETS, registry=r)
        self.history = Histogram("ctrstream_scorer_history_length", "behaviors seen by the model per request",
                                 buckets=_LENGTH_BUCKETS, registry=r)
        self.cache = Counter("ctrstream_scorer_encoding_cache", "per-user encoding lookups by outcome",
                             ["outcome"], registry=r)
        self.inflight = Gauge("ctrstream_scorer_inflight_requests", "Score requests admitted and not finished",
                              registry=r)
        self.model_info = Gauge("ctrstream_scorer_model_info", "1 for the model version being served",
                                ["name", "version"], registry=r)
        self.reloads = Counter("ctrstream_scorer_model_reloads", "model reload attempts", ["result"],
                               registry=r)
        self.reference = Gauge("ctrstream_scorer_reference_kernels",
                               "1 when the ranker runs the torch reference ops (no Triton/GPU)", registry=r)
        self.reference.set(0 if torch.cuda.is_available() else 1)
        self._counts = {o: 0 for o in (CacheOutcome.HIT, CacheOutcome.EXTEND, CacheOutcome.MISS,
                                       CacheOutcome.EMPTY, CacheOutcome.NONE)}
        self._lock = threading.Lock()
        age = Gauge("ctrstream_scorer_model_age_seconds", "age of the served model version", registry=r)
        age.set_function(lambda: (m.age_s() if (m := current_model()) is not None else float("nan")))
        ratio = Gauge("ctrstream_scorer_encoding_cache_hit_ratio",
                      "share of requests whose user encoding came from the cache, since start", registry=r)
        ratio.set_function(self.cache_hit_ratio)
        self._cache_bytes = Gauge("ctrstream_scorer_encoding_cache_bytes", "bytes held by the encoding cache",
                                  registry=r)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.latency.labels(method, code).observe(seconds)

    def observe_score(self, result: ScoreResult, num_candidates: int) -> None:
        self.candidates.observe(num_candidates)
        self.history.observe(result.history_len)
        self.cache.labels(result.cache).inc()
        with self._lock:
            self._counts[result.cache] = self._counts.get(result.cache, 0) + 1

    def cache_hit_ratio(self) -> float:
        with self._lock:
            total = sum(self._counts.values())
            hits = self._counts[CacheOutcome.HIT] + self._counts[CacheOutcome.EXTEND] + \
                self._counts[CacheOutcome.EMPTY]
        return hits / total if total else 0.0

    def set_cache_bytes(self, nbytes: int) -> None:
        self._cache_bytes.set(nbytes)

    def model_changed(self, model: LoadedModel) -> None:
        self.model_info.clear()
        self.model_info.labels(model.name, model.version).set(1)
        self.reloads.labels("ok").inc()

    def reload_failed(self) -> None:
        self.reloads.labels("failed").inc()
