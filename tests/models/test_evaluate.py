"""Metrics and the offline evaluation: definitions, the point-in-time replay, one tiny end-to-end run."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from models.evaluate import (
    EvalSettings,
    add_evaluate_arguments,
    evaluate_command,
    replay_events,
    run_evaluation,
)
from models.metrics import auc, calibration, gauc, logloss
from pipeline.events import hash_id


def test_auc_and_gauc_definitions():
    y = np.array([1, 0, 1, 0, 1, 0])
    s = np.array([0.9, 0.1, 0.4, 0.6, 0.7, 0.7])
    users = np.array([1, 1, 2, 2, 3, 3])
    # per user: u1 AUC 1, u2 AUC 0, u3 tie 0.5 -> impression-weighted (2 each) mean 0.5
    assert gauc(s, y, users) == pytest.approx(0.5)
    assert auc(s, y) == pytest.approx(6.5 / 9)
    only_pos = np.array([1, 1, 0, 0])
    assert gauc(np.array([0.2, 0.3, 0.1, 0.9]), only_pos, np.array([7, 7, 8, 8])) != gauc(
        np.array([0.2, 0.3, 0.1, 0.9]), only_pos, np.array([7, 8, 7, 8]))
    assert np.isnan(gauc(s[:2], np.array([1, 1]), users[:2]))  # no user has both labels


def test_gauc_matches_a_per_user_loop():
    rng = np.random.default_rng(0)
    s, y, u = rng.integers(0, 9, 400).astype(float), rng.random(400) < 0.3, rng.integers(0, 25, 400)
    num = den = 0.0
    for user in np.unique(u):
        m = u == user
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * auc(s[m], y[m])
            den += m.sum()
    assert gauc(s, y, u) == pytest.approx(num / den)


def test_logloss_and_calibration():
    assert logloss(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(np.log(2))
    assert calibration(np.array([0.2, 0.2]), np.array([1, 0])) == pytest.approx(0.4)


def test_replay_is_point_in_time_and_labels_within_the_window():
    ev = [
        {"type": "behavior", "user_id": "u", "item_id": "a", "category_id": "x", "ts": 1000},
        {"type": "impression", "user_id": "u", "item_id": "b", "category_id": "y", "request_id": "r1", "ts": 2000},
        {"type": "impression", "user_id": "u", "item_id": "c", "category_id": "y", "request_id": "r1", "ts": 2000},
        {"type": "click", "user_id": "u", "item_id": "b", "category_id": "y", "request_id": "r1", "ts": 2500},
        {"type": "behavior", "user_id": "u", "item_id": "d", "category_id": "x", "ts": 3000},
        {"type": "impression", "user_id": "u", "item_id": "e", "category_id": "x", "request_id": "r2", "ts": 4000},
        {"type": "click", "user_id": "u", "item_id": "e", "category_id": "x", "request_id": "r2", "ts": 10_000},
    ]
    rep = replay_events(ev, attribution_ms=5000)
    assert rep.seq_pos.tolist() == [1, 1, 3]  # the click on b is a behavior before r2
    assert rep.label.tolist() == [1, 0, 0]  # r2's click came 6 s later: outside the 5 s window
    h = rep.histories(np.array([2]), 10)[0]
    assert h.item.tolist() == [hash_id("a"), hash_id("b"), hash_id("d")]
    assert h.action.tolist()[1] == 2  # the click is stored as action "click"


def test_evaluate_runs_all_presets_and_writes_json_and_markdown(tmp_path):
    settings = EvalSettings(seq_len=120, epochs=1, batch_size=64, embed_dim=8, infer_seq_len=120,
                            infer_candidates=50)
    opts = {"users": 12, "behaviors_per_user": 150, "impressions_per_user": 12, "categories": 30,
            "items_per_category": 10}
    doc = run_evaluation("synthetic", ["din", "din_long", "sdim", "dare", "diffumin"], tmp_path, settings, opts,
                         progress=lambda _msg: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in saved["results"]] == ["din", "din_long", "sdim", "dare", "diffumin"]
    for r in saved["results"]:
        assert {"auc", "gauc", "logloss", "train_samples_per_s", "infer_ms_per_1k"} <= set(r)
        assert 0 <= r["auc"] <= 1 and r["infer_ms_per_1k"] > 0
    assert saved["bayes_auc"] == doc["bayes_auc"] and 0.5 < saved["bayes_auc"] <= 1
    md = (tmp_path / "results.md").read_text()
    assert "| sdim |" in md and "GAUC" in md


def test_cli_arguments_parse_and_reject_unknown_models(tmp_path):
    p = argparse.ArgumentParser()
    add_evaluate_arguments(p)
    args = p.parse_args(["--models", "din,bogus", "--out", str(tmp_path), "-o", "users=3"])
    assert args.option == [("users", 3)]
    with pytest.raises(ValueError, match="bogus"):
        evaluate_command(args)
