"""The one door to MLflow tracking (STYLE R15).

:class:`RunTracker` creates its run lazily, logs params in chunks of 100 through ``log_batch``,
sanitises keys, always passes ``step``, ships metrics from a background thread so the online loop
never waits on the tracking store, and ends the run FINISHED or FAILED.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # MLflow is imported where it is used: a data-parallel rank > 0 never loads it
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

__all__ = ["RunTracker", "default_tracking_uri", "sanitize_key"]

log = logging.getLogger(__name__)

_PARAM_CHUNK = 100  # MLflow's log_batch accepts at most 100 params per call
_METRIC_CHUNK = 1000  # and at most 1000 metrics
_BAD = re.compile(r"[^0-9A-Za-z_\-. /]")


def default_tracking_uri(base: str | Path = ".ctrstream") -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store under ``base``."""
    import os

    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    p = Path(base).resolve()
    p.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{p / 'mlflow.db'}"


def sanitize_key(key: str) -> str:
    """MLflow keys allow alphanumerics, ``_ - . space /``; anything else becomes ``_``."""
    return _BAD.sub("_", key)[:250]


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | None = None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifact_root))
    except Exception:  # noqa: BLE001 - created concurrently by another process
        exp = client.get_experiment_by_name(name)
        assert exp is not None
        return str(exp.experiment_id)


class RunTracker:
    """One MLflow run, logged asynchronously.

    Args:
        client: an ``MlflowClient`` bound to the tracking URI.
        experiment: experiment name (created if missing).
        run_name: display name of the run.
        artifact_root: artifact location for a newly created experiment (None: the server default).
    """

    def __init__(self, client: MlflowClient, experiment: str, run_name: str,
                 artifact_root: str | None = None, run_id: str | None = None) -> None:
        self.client = client
        self.experiment = experiment
        self.run_name = run_name
        self.artifact_root = artifact_root
        self._run_id = run_id
        self._q: queue.Queue[tuple[list[Metric], list[Param], list[RunTag]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: Exception | None = None

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            exp_id = ensure_experiment(self.client, self.experiment, self.artifact_root)
            run = self.client.create_run(exp_id, run_name=self.run_name)
            self._run_id = run.info.run_id
        return self._run_id

    def _worker(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            metrics, params, tags = item
            try:
                for i in range(0, len(params), _PARAM_CHUNK):
                    self.client.log_batch(self.run_id, params=params[i:i + _PARAM_CHUNK])
                for i in range(0, len(metrics), _METRIC_CHUNK):
                    self.client.log_batch(self.run_id, metrics=metrics[i:i + _METRIC_CHUNK])
                if tags:
                    self.client.log_batch(self.run_id, tags=tags)
            except Exception as e:  # noqa: BLE001 - logging must never kill training
                self._error = e
                log.warning("MLflow logging failed: %s", e)

    def _submit(self, metrics: list[Metric], params: list[Param], tags: list[RunTag]) -> None:
        _ = self.run_id  # create the run in the caller's thread (errors surface early)
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="mlflow-logger", daemon=True)
            self._thread.start()
        self._q.put((metrics, params, tags))

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self._submit([], [Param(sanitize_key(k), str(v)[:6000]) for k, v in params.items()], [])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(sanitize_key(k), float(v), ts, int(step)) for k, v in metrics.items() if v == v]
        if ms:
            self._submit(ms, [], [])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._submit([], [], [RunTag(sanitize_key(k), str(v)) for k, v in tags.items()])

    def flush(self) -> None:
        """Wait until everything submitted so far is written."""
        if self._thread is None:
            return
        self._q.put(None)
        self._thread.join()
        self._thread = None

    def finish(self, failed: bool = False) -> None:
        self.flush()
        if self._run_id is not None:
            self.client.set_terminated(self._run_id, "FAILED" if failed else "FINISHED")

    @property
    def last_error(self) -> Exception | None:
        return self._error
