"""Where the scorer's models come from, and the hot-reload loop that follows them.

A :class:`ModelSource` answers two questions: which version should be served now
(``current_version``, e.g. the registry alias ``champion``) and how to load a version
(``load``). Two implementations:

- :class:`MlflowModelSource`: the MLflow model registry. The trainer logs each model with
  ``mlflow.pyfunc.log_model(name="model", python_model=..., artifacts={"ranker": <dir with
  config.json + state_dict.pt>})``; the source resolves the alias with
  ``MlflowClient.get_model_version_by_alias``, downloads ``models:/<name>/<version>`` and rebuilds
  the ranker with ``models.load_ranker`` from the ``ranker`` artifact (never a pickled module).
- :class:`DirectoryModelSource`: a folder of ``models.save_ranker`` outputs, one subfolder per
  version, plus an alias file (``<root>/champion`` holding a version name). For tests, benchmarks
  and registry-less deployments.

:class:`ModelReloader` polls the source; on a new version it loads it, warms it up with a dummy
request (first-request latency spikes after a reload are the classic serving complaint: TF Serving
#385, Triton #8117), and only then swaps it into the :class:`~serving.scorer.Scorer` (one reference
assignment). A version that fails to load or warm up is not retried until the alias moves again,
and the old model keeps serving.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from serving.scorer import LoadedModel, Scorer

__all__ = ["DirectoryModelSource", "MlflowModelSource", "ModelReloader", "ModelSource"]

log = logging.getLogger(__name__)

RankerLoader = Callable[[str], Any]  # directory of config.json + state_dict.pt -> ranker


def _default_loader(path: str) -> Any:
    from models import load_ranker

    return load_ranker(path)


@runtime_checkable
class ModelSource(Protocol):
    """A place the scorer gets models from."""

    name: str  # model name reported in every response

    def current_version(self) -> str | None:
        """The version that should be served now (None: nothing published yet)."""

    def load(self, version: str) -> LoadedModel:
        """Load ``version``; raises on any failure."""

    def describe(self) -> str:
        """One line for logs (no secrets)."""


class MlflowModelSource:
    """Follows ``alias`` of registered model ``name`` in an MLflow registry.

    Args:
        name (str): registered model name.
        alias (str, default "champion"): alias to follow.
        tracking_uri (str | None, default None): MLflow tracking/registry URI (None: MLflow's own
            resolution, i.e. ``MLFLOW_TRACKING_URI``).
        loader (callable, default ``models.load_ranker``): rebuilds a ranker from its directory.
    """

    def __init__(
        self,
        name: str,
        alias: str = "champion",
        tracking_uri: str | None = None,
        loader: RankerLoader | None = None,
    ) -> None:
        self.name = name
        self.alias = alias
        self.tracking_uri = tracking_uri
        self._loader = loader or _default_loader
        self._client: Any = None

    def _mlflow(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def current_version(self) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self._mlflow().get_model_version_by_alias(self.name, self.alias)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None  # model or alias not registered yet
            raise
        return str(mv.version)

    def load(self, version: str) -> LoadedModel:
        mv = self._mlflow().get_model_version(self.name, version)
        with tempfile.TemporaryDirectory(prefix="ctrstream-model-") as tmp:
            # through this client: ``models:/`` URIs resolve against the *global* registry URI
            local = self._mlflow().download_artifacts(mv.run_id, "model", tmp)
            ranker = self._loader(str(_ranker_dir(Path(local))))
        created = mv.creation_timestamp / 1000.0 if mv.creation_timestamp else None
        return LoadedModel(ranker=ranker, name=self.name, version=str(version), created_at=created)

    def describe(self) -> str:
        return f"mlflow registry model {self.name!r} alias {self.alias!r}"


def _ranker_dir(model_dir: Path) -> Path:
    """The ``ranker`` artifact inside a downloaded pyfunc model directory.

    pyfunc copies each artifact to ``artifacts/<basename of the logged path>`` and records the
    relative path in ``MLmodel``; read it from there, falling back to ``artifacts/ranker``.
    """
    mlmodel = model_dir / "MLmodel"
    if mlmodel.exists():
        import yaml

        meta = yaml.safe_load(mlmodel.read_text()) or {}
        rel = (
            meta.get("flavors", {}).get("python_function", {}).get("artifacts", {}).get("ranker", {}).get("path")
        )
        if rel and (model_dir / str(rel)).is_dir():
            return model_dir / str(rel)
    fallback = model_dir / "artifacts" / "ranker"
    if fallback.is_dir():
        return fallback
    raise FileNotFoundError(f"no 'ranker' artifact (config.json + state_dict.pt) under {model_dir}")


class DirectoryModelSource:
    """Versions are subfolders of ``root`` (each a ``models.save_ranker`` output); the alias file
    ``root/<alias>`` names the current one. Without an alias file, the highest numeric version
    folder that holds a ``config.json`` is current.

    Args:
        root (str | Path): the folder.
        name (str, default "local"): model name reported in responses.
        alias (str, default "champion"): alias file name.
        loader (callable, default ``models.load_ranker``): rebuilds a ranker from a folder.
    """

    def __init__(
        self, root: str | os.PathLike[str], name: str = "local", alias: str = "champion",
        loader: RankerLoader | None = None,
    ) -> None:
        self.root = Path(root)
        self.name = name
        self.alias = alias
        self._loader = loader or _default_loader

    def current_version(self) -> str | None:
        alias_file = self.root / self.alias
        if alias_file.is_file():
            version = alias_file.read_text().strip()
            return version or None
        versions = [p.name for p in self.root.glob("*") if p.name.isdigit() and (p / "config.json").exists()]
        return max(versions, key=int) if versions else None

    def load(self, version: str) -> LoadedModel:
        path = self.root / version
        if not path.is_dir():
            raise FileNotFoundError(f"model version folder {path} does not exist")
        ranker = self._loader(str(path))
        return LoadedModel(ranker=ranker, name=self.name, version=version, created_at=path.stat().st_mtime)

    def set_alias(self, version: str) -> None:
        """Point the alias at ``version`` atomically (write a temp file, then rename)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{self.alias}.tmp"
        tmp.write_text(version)
        os.replace(tmp, self.root / self.alias)

    def describe(self) -> str:
        return f"model directory {str(self.root)!r} alias {self.alias!r}"


class ModelReloader:
    """Keeps ``scorer`` on the source's current version: poll, load, warm up, swap.

    ``check_once`` does one round synchronously (the server runs it off the event loop on its own
    thread, so loading never occupies a scoring worker); ``start``/``stop`` run it periodically on
    a daemon thread for embedders that have no event loop.

    Args:
        scorer (Scorer): receives the new models.
        source (ModelSource): where versions come from.
        poll_interval_s (float, default 10.0): seconds between polls.
        on_change (callable | None): called with the new LoadedModel after each swap.
    """

    def __init__(
        self,
        scorer: Scorer,
        source: ModelSource,
        poll_interval_s: float = 10.0,
        on_change: Callable[[LoadedModel], None] | None = None,
    ) -> None:
        self.scorer = scorer
        self.source = source
        self.poll_interval_s = poll_interval_s
        self.on_change = on_change
        self.last_success: float | None = None  # monotonic time of the last successful poll
        self.last_error: str | None = None
        self.reloads = 0
        self.failures = 0
        self._failed_version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> bool:
        """Poll the source; load, warm up and swap if the version changed. True if swapped.

        Never raises: a failing poll or load is logged and counted, and the old model keeps serving.
        """
        with self._lock:  # one reload at a time, whoever calls
            try:
                version = self.source.current_version()
            except Exception as exc:  # registry unreachable: keep serving, health shows staleness
                self.failures += 1
                self.last_error = f"poll failed: {exc}"
                log.warning("model source poll failed", exc_info=True)
                return False
            self.last_success = time.monotonic()
            current = self.scorer.model
            if version is None or (current is not None and current.version == version):
                return False
            if version == self._failed_version:
                return False
            started = time.monotonic()
            try:
                model = self.source.load(version)
                self.scorer.warm_up(model)
            except Exception as exc:
                self.failures += 1
                self._failed_version = version
                self.last_error = f"version {version} failed to load: {exc}"
                log.error("model load failed; keeping the current model",
                          exc_info=True, extra={"model_version": version})
                return False
            self.scorer.swap(model)
            self.reloads += 1
            self.last_error = None
            log.info(
                "model swapped in",
                extra={"model_name": model.name, "model_version": version,
                       "previous_version": current.version if current else None,
                       "load_s": round(time.monotonic() - started, 3)},
            )
        if self.on_change is not None:
            self.on_change(model)
        return True

    def seconds_since_success(self) -> float | None:
        return None if self.last_success is None else time.monotonic() - self.last_success

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="model-reloader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check_once()
            self._stop.wait(self.poll_interval_s)
