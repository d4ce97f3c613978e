"""The online trainer's Prometheus metrics (models/trainer_metrics.py)."""

from __future__ import annotations

import json
import math
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import generate_latest

from models.online import TrainerSettings, run_trainer
from models.trainer_metrics import TrainerMetrics
from pipeline.events import RawRecord
from pipeline.exceptions import ConfigError
from pipeline.state import open_store
from tests.models.test_online import _samples, trainer  # noqa: F401 - the fixture
from tests.pipeline.test_metrics import samples_of


def test_metrics_read_the_trainers_counters_window_and_registry(trainer):  # noqa: F811 - the fixture
    now = time.time() + 5
    m = TrainerMetrics(trainer, clock=lambda: now)
    got = samples_of(generate_latest(m.registry).decode())
    assert got[("ctrstream_trainer_samples_total", ())] == 0
    assert math.isnan(got[("ctrstream_trainer_last_step_timestamp_seconds", ())])
    assert not any(name == "ctrstream_trainer_model_window" for name, _ in got)
    recs = [RawRecord("samples", 0, i, b"1", json.dumps(x).encode()) for i, x in enumerate(_samples(64))]
    trainer.learn(trainer._parse(recs))
    trainer.learn(trainer._parse([r._replace(offset=64 + r.offset) for r in recs[:10]]))  # replayed: skipped
    got = samples_of(generate_latest(m.registry).decode())
    assert got[("ctrstream_trainer_samples_total", ())] == trainer.total_samples == 64
    assert got[("ctrstream_trainer_duplicates_skipped_total", ())] == trainer.duplicates == 10
    assert got[("ctrstream_trainer_seq_read_seconds_total", ())] == trainer.data_s > 0
    assert got[("ctrstream_trainer_last_step_age_seconds", ())] == pytest.approx(now - trainer.last_step_unix)
    for slot in trainer.slots:
        model = (("model", slot.name),)
        assert got[("ctrstream_trainer_model_steps_total", model)] == slot.report.steps == 1
        assert got[("ctrstream_trainer_model_samples_total", model)] == 64
        assert got[("ctrstream_trainer_model_train_seconds_total", model)] == slot.step_s > 0
        window = {dict(labels)["metric"]: v for (name, labels), v in got.items()
                  if name == "ctrstream_trainer_model_window" and dict(labels)["model"] == slot.name}
        assert set(window) == {"auc", "gauc", "logloss", "calibration", "ctr", "loss"}
        assert window == pytest.approx(slot.last_metrics) and window["ctr"] == 0.5
        assert window["auc"] == pytest.approx(slot.window.metrics()["auc"])
        assert got[("ctrstream_trainer_model_registered_versions_total", model)] == 0
    trainer.checkpoint()  # a registry version per model; the first one becomes the champion
    got = samples_of(generate_latest(m.registry).decode())
    for slot in trainer.slots:
        assert got[("ctrstream_trainer_model_registered_versions_total", (("model", slot.name),))] == 1
        champions = [dict(labels)["version"] for (name, labels), v in got.items()
                     if name == "ctrstream_trainer_model_champion" and dict(labels)["model"] == slot.name and v == 1]
        assert champions == [slot.champion_version] and slot.champion_version is not None
    info = [dict(labels) for name, labels in got if name == "ctrstream_trainer_info"]
    assert info == [{"group": "ctrstream-trainer", "client": "kafka-python", "store": "lmdb", "world_size": "1"}]


def test_metrics_are_served_over_http_and_the_port_closes(trainer):  # noqa: F811 - the fixture
    m = TrainerMetrics(trainer)
    port = m.serve_http(0)
    trainer.learn(_samples(32))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        got = samples_of(r.read().decode())
    assert got[("ctrstream_trainer_samples_total", ())] == 32
    m.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_a_metrics_port_in_use_fails_at_start_up_naming_the_setting(tmp_path):
    open_store(f"lmdb://{tmp_path}/store").close()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bad = TrainerSettings(store=f"lmdb://{tmp_path}/store", models="din", tracking_uri=f"sqlite:///{tmp_path}/m.db",
                              checkpoint_dir=str(tmp_path / "ck"), metrics_port=taken.getsockname()[1],
                              bootstrap_servers="127.0.0.1:9")  # never reached: the port fails first
        with pytest.raises(ConfigError, match="metrics_port: cannot serve /metrics on 127.0.0.1"):
            run_trainer(bad, install_signals=False)
