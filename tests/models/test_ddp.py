"""Data-parallel online training: two `ctrstream train` ranks (gloo, CPU, loopback) over a
three-partition samples topic on the embedded broker, a real LMDB store and a real MLflow SQLite store.

Rank 0 owns partitions 0 and 2, rank 1 partition 1, so the ranks hold different numbers of samples in
most steps and rank 1 runs dry first: it must keep stepping (on placeholder batches of weight 0) until
rank 0 is done, or DDP would hang. The test then proves that both ranks hold bit-identical weights,
that the union of the ids they learned is the whole stream exactly once, and that rank 0 alone
registered versions (tagged with every partition's offsets). The slow test kills one rank mid-stream
and proves the same after both restart from their crash-safe state.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from models.distributed import common_generation, state_digest
from pipeline.broker import create_topics, free_port
from pipeline.config import TrainerSettings, load_settings
from pipeline.exceptions import ConfigError
from pipeline.kafka import make_producer
from pipeline.state import StateDelta, open_store
from tests.fixtures import make_behaviors

MODELS = ["din", "sdim"]
USERS = 12


def _produce(broker, topic: str, start: int, n: int, replay: int = 0) -> set[str]:
    """Samples ``start..start+n`` keyed by user (so a user's samples share a partition), plus
    ``replay`` re-sent copies of earlier ones (an upstream replay the trainer must skip)."""
    rng = np.random.default_rng(start)
    p = make_producer("kafka-python", broker.bootstrap)
    ids = set()
    sent = []
    for i in range(start, start + n):
        u = int(rng.integers(1, USERS + 1))
        s = {"sample_id": f"r{i}:1", "user_id": str(u), "item_id": str(i % 97), "category_id": "1", "ts": i,
             "seq_pos": int(rng.integers(0, 201)), "label": int(rng.random() < 0.3), "user_hash": u,
             "item_hash": i % 97 + 1, "category_hash": 1 + i % 5}
        ids.add(s["sample_id"])
        sent.append(s)
        p.send(topic, str(u).encode(), json.dumps(s).encode())
    for s in sent[:replay]:
        p.send(topic, s["user_id"].encode(), json.dumps(s).encode())
    p.flush()
    p.close()
    return ids


def _start_ranks(broker, topic: str, setup: dict, prefix: str, checkpoint_every: int) -> list[subprocess.Popen]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")  # two ranks share this box's cores
    procs = []
    for rank in (0, 1):
        cmd = [sys.executable, "-m", "pipeline.cli", "train", "--bootstrap-servers", broker.bootstrap,
               "--samples-topic", topic, "--store", setup["store"], "--models", ",".join(MODELS),
               "--tracking-uri", setup["mlflow"], "--checkpoint-dir", str(setup["ckpt"]), "--state-every", "64",
               "--checkpoint-every", str(checkpoint_every), "--batch-size", "32", "--exit-when-idle", "2",
               "--seq-len", "64", "--short-len", "16", "--item-buckets", "1024", "--category-buckets", "64",
               "--registered-prefix", prefix, "--group-id", f"t-{prefix}", "--experiment", prefix,
               "--world-size", "2", "--rank", str(rank), "--dist-init", f"tcp://127.0.0.1:{port}",
               "--dist-timeout-s", "120"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    return procs


def _wait(procs: list[subprocess.Popen]) -> list[tuple[str, str]]:
    results = []
    for proc in procs:
        try:
            results.append(proc.communicate(timeout=240))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    return results


def _run_ranks(broker, topic: str, setup: dict, prefix: str, checkpoint_every: int) -> list[dict]:
    """Both ranks to the end of the stream (idle exit); their final crash-safe states."""
    procs = _start_ranks(broker, topic, setup, prefix, checkpoint_every)
    results = _wait(procs)
    for proc, (out, _) in zip(procs, results, strict=True):
        assert proc.returncode == 0, "\n".join(f"rank {r} exited {q.returncode}:\n{e[-2500:]}"
                                               for r, (q, (_, e)) in enumerate(zip(procs, results, strict=True)))
        assert [json.loads(line)["model"] for line in out.strip().splitlines()] == MODELS
    for rank, (out, _) in enumerate(results):  # strict JSON exit lines; metrics on rank 0 only
        lines = [json.loads(line, parse_constant=lambda c: pytest.fail(f"rank {rank} printed {c}"))
                 for line in out.strip().splitlines()]
        assert all(x["rank"] == rank and (x["progressive_auc"] is None) == (rank > 0) for x in lines), lines
    states = []
    for rank in (0, 1):
        files = _state_files(setup["ckpt"], rank)
        assert len(files) == 1, f"rank {rank}: older generations must be deleted, found {files}"
        states.append(torch.load(files[0], weights_only=True))
    assert states[0]["generation"] == states[1]["generation"]
    return states


def _state_files(ckpt: Path, rank: int) -> list[Path]:
    return sorted(ckpt.glob(f"state-rank{rank}-of2-g*.pt"))


def _setup(broker, tmp_path: Path) -> tuple[str, str, dict]:
    tag = uuid.uuid4().hex[:8]
    topic, prefix = f"samples-ddp-{tag}", f"ddp{tag}-"
    store_uri = f"lmdb://{tmp_path}/store"
    store = open_store(store_uri)
    for u in range(USERS):
        store.commit(StateDelta("g", appends={u + 1: make_behaviors(200, seed=u)}))
    store.close()
    create_topics(broker.bootstrap, {topic: 3})
    return topic, prefix, {"store": store_uri, "mlflow": f"sqlite:///{tmp_path}/mlflow.db", "ckpt": tmp_path / "ckpt"}


def _check(states: list[dict], ids: set[str], replays: int) -> None:
    r0, r1 = states
    # bit-identical weights: the digests every rank took of its own model and loss buffers...
    assert r0["digests"] == r1["digests"]
    # ...and rank 0's digests are those of the weights it saved
    for slot, digest in zip(r0["slots"], r0["digests"], strict=True):
        saved = {**{f"ranker.{k}": v for k, v in slot["model"].items()}, **slot["loss_state"]}
        assert state_digest(saved) == digest
    # the union of what the ranks learned is the whole stream, exactly once
    s0, s1 = set(r0["seen"]), set(r1["seen"])
    assert not s0 & s1
    assert s0 | s1 == ids
    assert r0["samples"] + r1["samples"] == len(ids) == len(r0["seen"]) + len(r1["seen"])
    assert r0["total_samples"] == r1["total_samples"] == len(ids)
    assert r0["duplicates"] + r1["duplicates"] == replays
    assert {p for _, p, _ in r0["offsets"]} == {0, 2} and {p for _, p, _ in r1["offsets"]} == {1}
    # uneven partitions: the rank with fewer samples stepped on placeholders while the other learned
    small, big = sorted(states, key=lambda st: st["samples"])
    assert small["samples"] < big["samples"]
    assert small["placeholder_steps"] > 0
    for slot in r0["slots"]:
        assert slot["samples"] == len(ids)  # every model learned the union


@pytest.mark.kafka
def test_two_ranks_gloo_identical_weights_exact_union_rank0_registers(broker, tmp_path):
    topic, prefix, setup = _setup(broker, tmp_path)
    ids = _produce(broker, topic, 0, 300, replay=7)
    states = _run_ranks(broker, topic, setup, prefix, checkpoint_every=160)  # a version mid-run and at exit
    _check(states, ids, replays=7)

    client = MlflowClient(setup["mlflow"])
    exp = client.get_experiment_by_name(prefix)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == len(MODELS)  # rank 0's runs only
    assert all(r.data.params["world_size"] == "2" for r in runs)
    for m in MODELS:
        versions = client.search_model_versions(f"name='{prefix}{m}'")
        assert len(versions) == 2, f"rank 0 registered {len(versions)} versions of {m}"
        last = max(versions, key=lambda v: int(v.version))
        assert int(last.tags["samples"]) == len(ids)
        assert set(json.loads(last.tags["input_offsets"])) == {f"{topic}/{p}" for p in range(3)}
        assert last.tags["world_size"] == "2"


@pytest.mark.kafka
@pytest.mark.slow
def test_ranks_resume_after_one_is_killed(broker, tmp_path):
    """SIGKILL rank 1 mid-stream: rank 0 fails too (its collectives lose the peer); both restart from
    the newest generation they both hold and end with the whole stream learned once, same weights."""
    topic, prefix, setup = _setup(broker, tmp_path)
    ids = _produce(broker, topic, 0, 900, replay=9)
    procs = _start_ranks(broker, topic, setup, prefix, checkpoint_every=256)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and procs[1].poll() is None:
        gens = [int(f.name.rsplit("-g", 1)[1][:-3]) for f in _state_files(setup["ckpt"], 1)]
        if gens and max(gens) >= 3:
            break
        time.sleep(0.05)
    assert procs[1].poll() is None, "rank 1 finished before it could be killed"
    procs[1].send_signal(signal.SIGKILL)
    _wait(procs)
    assert procs[0].returncode != 0  # rank 0 cannot go on alone
    assert procs[1].returncode == -signal.SIGKILL

    states = _run_ranks(broker, topic, setup, prefix, checkpoint_every=256)
    _check(states, ids, replays=9)
    client = MlflowClient(setup["mlflow"])
    for m in MODELS:
        last = max(client.search_model_versions(f"name='{prefix}{m}'"), key=lambda v: int(v.version))
        assert int(last.tags["samples"]) == len(ids)


def test_torchrun_variables_configure_the_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    s = load_settings(TrainerSettings, {})
    assert (s.world_size, s.rank, s.local_rank) == (4, 3, 1)
    assert load_settings(TrainerSettings, {"rank": 2}).rank == 2  # a flag wins
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="not below world_size"):
        load_settings(TrainerSettings, {})


def test_ranks_resume_from_the_newest_generation_they_all_hold():
    assert common_generation([[], []]) is None
    assert common_generation([[3, 4], [3, 4]]) == 4
    assert common_generation([[3, 4], [3]]) == 3  # rank 1 crashed before writing generation 4
    with pytest.raises(ConfigError, match="share no generation"):
        common_generation([[7], [2]])
