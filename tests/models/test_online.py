"""The online trainer's data path: point-in-time reads, de-duplication, progressive metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

import models.online as online
from models.online import OnlineTrainer, TrainerSettings
from pipeline.events import RawRecord
from pipeline.state import Behaviors, StateDelta, open_store

PLANTED = 987_654_321  # an item id that only ever appears *after* every sample's seq_pos


@pytest.fixture
def trainer(tmp_path):
    uri = f"lmdb://{tmp_path}/store"
    s = open_store(uri)
    rng = np.random.default_rng(0)
    for u in (1, 2, 3):
        n = 100
        s.commit(StateDelta("g", appends={u: Behaviors(rng.integers(1, 5000, n), rng.integers(1, 50, n),
                                                       np.ones(n, np.uint8), np.arange(n))}))
        # the future: behaviors after position 100 carry the planted item
        s.commit(StateDelta("g", appends={u: Behaviors(np.full(20, PLANTED), np.ones(20, np.int64),
                                                       np.ones(20, np.uint8), np.arange(20) + 1000)}))
    s.close()
    settings = TrainerSettings(store=uri, models="din,sdim", seq_len=64, short_len=16, item_buckets=1 << 12,
                               category_buckets=64, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                               checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=10**9, state_every=10**9)
    tr = OnlineTrainer(settings)
    yield tr
    tr.finish()


def _samples(n, start=0):
    return [{"sample_id": f"s{start + i}", "user_hash": 1 + i % 3, "item_hash": 7 + i, "category_hash": 3,
             "seq_pos": 50 + i % 50, "label": i % 2} for i in range(n)]


def test_history_is_read_as_of_seq_pos_never_later(trainer, monkeypatch):
    seen_items: list[np.ndarray] = []
    real = online.build_batch

    def spy(hists, *a, **k):
        for h in hists:
            seen_items.append(h.item.copy())
            assert h.end <= 100  # every read ends at or before its sample's seq_pos
        return real(hists, *a, **k)

    monkeypatch.setattr(online, "build_batch", spy)

    trainer.learn(_samples(40))
    assert seen_items and not any(PLANTED in items for items in seen_items)


def test_duplicate_sample_ids_are_learned_once(trainer):
    recs = [RawRecord("samples", 0, i, b"1", json.dumps(s).encode()) for i, s in enumerate(_samples(30))]
    trainer.learn(trainer._parse(recs))
    replay = [RawRecord("samples", 0, 30 + i, b"1", r.value) for i, r in enumerate(recs[:10])]
    trainer.learn(trainer._parse(replay))
    assert trainer.samples == 30 and trainer.duplicates == 10
    assert all(s.report.samples == 30 for s in trainer.slots)
    assert trainer.offsets[("samples", 0)] == 40  # the replayed records are consumed all the same


def test_progressive_metrics_are_logged_per_model(trainer):
    trainer.learn(_samples(64))
    m = trainer.slots[0].window.metrics()
    assert set(m) >= {"auc", "gauc", "logloss", "calibration", "ctr"}
    assert 0.0 <= m["auc"] <= 1.0 and m["ctr"] == 0.5
