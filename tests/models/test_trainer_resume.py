"""Crash-safe resume: SIGKILL the trainer mid-stream, restart, learn exactly the same samples once."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.broker import create_topics
from pipeline.kafka import make_producer
from pipeline.state import StateDelta, open_store
from tests.fixtures import make_behaviors

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _setup(broker, tmp_path: Path, n_samples: int = 1200) -> tuple[str, str, set[str]]:
    tag = uuid.uuid4().hex[:8]
    topic = f"samples-{tag}"
    store_uri = f"lmdb://{tmp_path}/store"
    store = open_store(store_uri)
    for u in range(20):
        store.commit(StateDelta("g", appends={u + 1: make_behaviors(300, seed=u)}))
    store.close()
    create_topics(broker.bootstrap, {topic: 2})
    rng = np.random.default_rng(1)
    p = make_producer("kafka-python", broker.bootstrap)
    ids = set()
    for i in range(n_samples):
        u = int(rng.integers(1, 21))
        s = {"sample_id": f"r{i}:1", "user_id": str(u), "item_id": str(i % 97), "category_id": "1", "ts": i,
             "seq_pos": int(rng.integers(0, 301)), "label": int(rng.random() < 0.3), "user_hash": u,
             "item_hash": int(i % 97) + 1, "category_hash": 1 + i % 5}
        ids.add(s["sample_id"])
        p.send(topic, str(u).encode(), json.dumps(s).encode())
        if i % 300 == 0:  # an upstream replay: a duplicate that must not be learned twice
            p.send(topic, str(u).encode(), json.dumps(s).encode())
    p.flush()
    p.close()
    return topic, store_uri, ids


def _cmd(broker, topic, store_uri, ckpt, uri, prefix):
    return [sys.executable, "-m", "pipeline.cli", "train", "--bootstrap-servers", broker.bootstrap,
            "--samples-topic", topic, "--store", store_uri, "--models", "din", "--tracking-uri", uri,
            "--checkpoint-dir", str(ckpt), "--state-every", "64", "--checkpoint-every", "100000",
            "--batch-size", "32", "--exit-when-idle", "10", "--seq-len", "64", "--short-len", "16",
            "--item-buckets", "1024", "--category-buckets", "64", "--registered-prefix", prefix,
            "--group-id", f"t-{prefix}"]


def _final(ckpt: Path) -> dict:
    return torch.load(ckpt / "state.pt", weights_only=True)


def test_sigkill_and_resume_learns_the_same_samples_once(broker, tmp_path):
    topic, store_uri, ids = _setup(broker, tmp_path, n_samples=700)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    ref_dir = tmp_path / "ref"
    r = subprocess.run(_cmd(broker, topic, store_uri, ref_dir, uri, "ref"), capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = _final(ref_dir)
    missing = sorted(ids - set(ref["seen"]), key=lambda x: int(x[1:].split(":")[0]))
    assert not missing, f"uninterrupted run missed {len(missing)}: {missing[:10]}…{missing[-5:]}\n{r.stderr[-2000:]}"
    assert ref["samples"] == len(ids)

    ckpt = tmp_path / "killed"
    rnd = random.Random(3)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(_cmd(broker, topic, store_uri, ckpt, uri, "killed"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        before = (ckpt / "state.pt").stat().st_mtime if (ckpt / "state.pt").exists() else 0.0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            st = ckpt / "state.pt"
            if st.exists() and st.stat().st_mtime > before:
                break  # made progress since (re)start
            time.sleep(0.05)
        time.sleep(rnd.uniform(0.0, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    r = subprocess.run(_cmd(broker, topic, store_uri, ckpt, uri, "killed"), capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    got = _final(ckpt)
    missing = sorted(set(ref["seen"]) - set(got["seen"]))
    assert not missing and set(got["seen"]) == set(ref["seen"]), (
        f"{len(missing)} samples never learned after {kills} kills: {missing[:10]}\n{r.stderr[-2000:]}")
    assert got["samples"] == len(ids)  # nothing learned twice, nothing skipped
    assert got["slots"][0]["samples"] == len(ids)


def test_sigterm_checkpoints_and_exits_zero(broker, tmp_path):
    topic, store_uri, ids = _setup(broker, tmp_path, n_samples=3000)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ckpt = tmp_path / "term"
    cmd = _cmd(broker, topic, store_uri, ckpt, uri, "term")
    cmd[cmd.index("--state-every") + 1] = "256"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (ckpt / "state.pt").exists() and time.monotonic() < deadline:  # wait until it is training
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    st = _final(ckpt)
    assert 0 < st["samples"] < len(ids) and len(st["seen"]) == st["samples"]  # stopped early, state saved
    assert json.loads(out.strip().splitlines()[-1])["samples"] == st["samples"]
