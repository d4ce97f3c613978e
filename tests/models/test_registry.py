"""Registry against a real MLflow SQLite store: versions, tags, aliases, pyfunc load-and-score."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from models import FeatureSpec, build_ranker
from models.registry import (
    decide_promotion,
    load_registered_ranker,
    log_ranker_version,
    record_decision,
    resolve_alias,
)
from models.tracking import RunTracker


@pytest.fixture
def client(tmp_path):
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def test_versions_aliases_and_promotion_by_evidence(client, tmp_path):
    import mlflow

    r = build_ranker("din", spec=FeatureSpec(seq_len=20, item_buckets=256, category_buckets=32))
    tr = RunTracker(client, "exp", "din-online", artifact_root=str(tmp_path / "art"))
    tr.log_params({"a": 1})
    tr.log_metrics({"auc": 0.6}, step=10)
    tr.flush()
    v1 = log_ranker_version(client, tr.run_id, r, "m", {"samples": 100})
    assert resolve_alias("m", "challenger", client.tracking_uri) == v1
    record_decision(client, "m", v1, decide_promotion(0.6, None, 0.01))
    assert resolve_alias("m", "champion", client.tracking_uri) == v1
    v2 = log_ranker_version(client, tr.run_id, r, "m", {"samples": 200})
    record_decision(client, "m", v2, decide_promotion(0.605, 0.60, 0.01))  # not by the margin
    assert resolve_alias("m", "champion", client.tracking_uri) == v1
    assert resolve_alias("m", "challenger", client.tracking_uri) == v2
    tags = client.get_model_version("m", v2).tags
    assert tags["promotion.decision"] == "kept" and tags["samples"] == "200"
    assert tags["promotion.champion_metric"] == "0.600000"
    v3 = log_ranker_version(client, tr.run_id, r, "m", {"samples": 300})
    record_decision(client, "m", v3, decide_promotion(0.65, 0.60, 0.01))
    assert resolve_alias("m", "champion", client.tracking_uri) == v3
    hist = client.get_metric_history(tr.run_id, "auc")
    assert [(m.step, m.value) for m in hist] == [(10, 0.6)]
    tr.finish()
    assert client.get_run(tr.run_id).info.status == "FINISHED"

    lm = load_registered_ranker("m", "champion", client.tracking_uri)
    assert lm.version == v3 and lm.ranker.config == r.config
    mlflow.set_tracking_uri(client.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/m@champion")
    df = pd.DataFrame({"hist_item": [list(range(1, 30)), []], "hist_category": [[1] * 29, []],
                       "item_hash": [5, 6], "category_hash": [1, 2]})
    p = np.asarray(model.predict(df))
    assert p.shape == (2,) and np.all((p > 0) & (p < 1))


def test_nan_challenger_never_promotes():
    assert not decide_promotion(float("nan"), 0.5, 0.0).promote
    assert decide_promotion(0.5, None, 0.0).promote
