"""Model registry: versions, aliases and evidence-based promotion (DESIGN.md §3 Models).

Every checkpoint becomes a new version of a registered model. A version's artifacts hold the
ranker as ``state_dict`` + ``config.json`` (never a pickled module) under ``artifacts/ranker``, and a
``mlflow.pyfunc`` wrapper (:class:`RankerPyfunc`) so ``mlflow.pyfunc.load_model("models:/NAME@champion")``
scores a DataFrame. Alias ``challenger`` always names the newest version; ``champion`` moves only
when the challenger beats it on the same recent evaluation window by a margin, and the decision is
recorded on the version as tags.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

if TYPE_CHECKING:
    # `mlflow.pyfunc` is a LazyLoader attribute of `mlflow`, not a module, to a type checker
    from mlflow.pyfunc.model import PythonModel as _PythonModel
else:
    _PythonModel = mlflow.pyfunc.PythonModel

__all__ = [
    "LoadedModel",
    "PromotionDecision",
    "RankerPyfunc",
    "decide_promotion",
    "load_registered_ranker",
    "log_ranker_version",
    "resolve_alias",
    "set_alias",
]

log = logging.getLogger(__name__)
# MLflow warns that a python_model object is pickled; ours holds no state (weights travel as
# state_dict + config.json and are rebuilt by models.load_ranker), so the warning does not apply.
logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)

CHAMPION = "champion"
CHALLENGER = "challenger"


warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)  # MLflow, at class creation


class RankerPyfunc(_PythonModel):
    """Scores a DataFrame with one row per (history, candidate).

    Columns: ``hist_item``, ``hist_category`` (lists of 63-bit hashed ids, oldest first),
    optional ``hist_action`` (list of ints), ``item_hash``, ``category_hash``. Returns pCTR per row.
    """

    def load_context(self, context: Any) -> None:
        from models import load_ranker

        self.ranker = load_ranker(context.artifacts["ranker"])
        self.ranker.eval()

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # MLflow reads hints
        import torch

        from models.features import build_batch
        from pipeline.state.base import Behaviors

        df = model_input
        hists = []
        for _, row in df.iterrows():
            items = np.asarray(row["hist_item"], dtype=np.int64)
            cats = np.asarray(row["hist_category"], dtype=np.int64)
            acts = np.asarray(row["hist_action"] if "hist_action" in df.columns else np.ones(len(items)),
                              dtype=np.uint8)
            hists.append(Behaviors(items, cats, acts, np.zeros(len(items), dtype=np.int64)))
        batch = build_batch(hists, df["item_hash"].to_numpy(np.int64), df["category_hash"].to_numpy(np.int64),
                            self.ranker.config.features)
        with torch.inference_mode():
            return torch.sigmoid(self.ranker(batch)).cpu().numpy()


@dataclass(frozen=True)
class LoadedModel:
    ranker: Any  # models.Ranker
    name: str
    version: str
    loaded_at: float


@dataclass(frozen=True)
class PromotionDecision:
    promote: bool
    reason: str
    challenger_metric: float
    champion_metric: float | None


def decide_promotion(challenger: float, champion: float | None, margin: float) -> PromotionDecision:
    """Champion moves only on evidence: the challenger's window metric beats the champion's by ``margin``.

    No champion yet: the first version becomes champion. A NaN challenger metric (e.g. a window with
    one class) never promotes.
    """
    if challenger != challenger:
        return PromotionDecision(False, "challenger metric undefined on the window", challenger, champion)
    if champion is None:
        return PromotionDecision(True, "no champion yet", challenger, None)
    if champion != champion:
        return PromotionDecision(True, "champion metric undefined on the window", challenger, champion)
    if challenger > champion + margin:
        return PromotionDecision(True, f"challenger beats champion by more than {margin}", challenger, champion)
    return PromotionDecision(False, f"challenger does not beat champion by more than {margin}", challenger, champion)


def _save_pyfunc(mdir: Path, rdir: Path) -> None:
    mlflow.pyfunc.save_model(
        path=str(mdir), python_model=RankerPyfunc(), artifacts={"ranker": str(rdir)},
        pip_requirements=["torch", "numpy", "pandas"],  # explicit: inference spawns a slow subprocess
    )


def log_ranker_version(client: MlflowClient, run_id: str, ranker: Any, registered_name: str,
                       tags: Mapping[str, Any]) -> str:
    """Log ``ranker`` under ``run_id`` as a pyfunc model and register it; returns the new version.

    Also moves alias ``challenger`` to it.
    """
    from models import save_ranker

    # No fluent API (it reads the *global* tracking URI): save locally, log through this client.
    with tempfile.TemporaryDirectory() as tmp:
        rdir = Path(tmp) / "ranker"
        save_ranker(ranker, rdir)
        mdir = Path(tmp) / "model"
        with warnings.catch_warnings():  # MLflow nags about predict() type hints; the schema is documented
            warnings.simplefilter("ignore", UserWarning)
            _save_pyfunc(mdir, rdir)
        client.log_artifacts(run_id, str(mdir), artifact_path="model")
    source = f"runs:/{run_id}/model"

    try:
        client.create_registered_model(registered_name)
    except MlflowException:
        pass  # exists
    mv = client.create_model_version(registered_name, source, run_id=run_id,
                                      tags={k: str(v) for k, v in tags.items()})
    _wait_ready(client, registered_name, mv.version)
    client.set_registered_model_alias(registered_name, CHALLENGER, mv.version)
    return str(mv.version)


def _wait_ready(client: MlflowClient, name: str, version: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get_model_version(name, version).status == "READY":
            return
        time.sleep(0.1)


def set_alias(client: MlflowClient, name: str, alias: str, version: str, decision: PromotionDecision | None = None,
              window: Mapping[str, Any] | None = None) -> None:
    """Point ``alias`` at ``version``; a promotion decision is recorded as tags on the version."""
    client.set_registered_model_alias(name, alias, version)
    if decision is not None:
        record = {
            "promotion.decision": "promoted" if decision.promote else "kept",
            "promotion.reason": decision.reason,
            "promotion.challenger_metric": f"{decision.challenger_metric:.6f}",
            "promotion.champion_metric": "none" if decision.champion_metric is None else f"{decision.champion_metric:.6f}",
            "promotion.at": f"{time.time():.0f}",
        }
        record.update({f"promotion.window.{k}": str(v) for k, v in (window or {}).items()})
        for k, v in record.items():
            client.set_model_version_tag(name, version, k, v)


def record_decision(client: MlflowClient, name: str, version: str, decision: PromotionDecision,
                    window: Mapping[str, Any] | None = None) -> None:
    """Record a decision on ``version``; move ``champion`` to it when ``decision.promote``."""
    if decision.promote:
        set_alias(client, name, CHAMPION, version, decision, window)
    else:
        tags = {"promotion.decision": "kept", "promotion.reason": decision.reason,
                "promotion.challenger_metric": f"{decision.challenger_metric:.6f}",
                "promotion.champion_metric": "none" if decision.champion_metric is None
                else f"{decision.champion_metric:.6f}"}
        tags.update({f"promotion.window.{k}": str(v) for k, v in (window or {}).items()})
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)


def resolve_alias(name: str, alias: str = CHAMPION, tracking_uri: str | None = None) -> str | None:
    """Version the alias points at, or None when the model or alias does not exist."""
    client = MlflowClient(tracking_uri)
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def load_registered_ranker(name: str, alias: str = CHAMPION, tracking_uri: str | None = None,
                           version: str | None = None) -> LoadedModel:
    """Download a registered version (by alias, or an explicit version) and rebuild its ranker."""
    from models import load_ranker

    client = MlflowClient(tracking_uri)
    if version is None:
        version = str(client.get_model_version_by_alias(name, alias).version)
    mv = client.get_model_version(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(cast(str, mv.run_id), "model", tmp)
        ranker = load_ranker(Path(local) / "artifacts" / "ranker")
    ranker.eval()
    return LoadedModel(ranker, name, str(version), time.time())


def version_table(name: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Rows for ``ctrstream models list``: version, aliases, creation time and the promotion tags."""
    client = MlflowClient(tracking_uri)
    rm = client.get_registered_model(name)
    aliases: dict[str, list[str]] = {}
    for a, v in (rm.aliases or {}).items():
        aliases.setdefault(str(v), []).append(a)
    rows = []
    for mv in client.search_model_versions(f"name='{name}'"):
        rows.append({"version": mv.version, "aliases": ",".join(sorted(aliases.get(str(mv.version), []))),
                     "created": mv.creation_timestamp, "run_id": mv.run_id,
                     "tags": json.dumps(dict(mv.tags), sort_keys=True)})
    return sorted(rows, key=lambda r: int(r["version"]))
