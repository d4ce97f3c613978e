"""End to end: the scorer as a subprocess (``python -m serving.cli serve``) on an ephemeral port,
an LMDB store written by another process, a real client and the ``score`` command, then SIGTERM
and a clean exit 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.state import open_store
from serving.client import ScorerClient
from tests.serving.fixtures import build_test_ranker, fill_store, save_test_ranker
from tests.serving.test_scorer import CATS, ITEMS, direct_scores

ROOT = Path(__file__).resolve().parents[2]


def _read_lines(stream, sink: list[str]) -> None:
    for line in iter(stream.readline, ""):
        sink.append(line)


def _listening_port(lines: list[str], proc: subprocess.Popen, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if '"scorer listening"' in line:
                return int(json.loads(line)["address"].rsplit(":", 1)[1])
        if proc.poll() is not None:
            raise AssertionError("scorer exited early:\n" + "".join(lines))
        time.sleep(0.05)
    raise AssertionError("scorer did not start:\n" + "".join(lines))


@pytest.mark.e2e
def test_serve_score_sigterm(tmp_path):
    store_uri = f"lmdb://{tmp_path / 'store'}"
    fill_store(open_store(store_uri), {"alice": 120, "bob": 10}).close()
    ranker = build_test_ranker("sdim")
    save_test_ranker(ranker, tmp_path / "models" / "1")
    (tmp_path / "models" / "champion").write_text("1")
    env = {**os.environ, "CTRSTREAM_SERVE_TOKENS": "e2e-token", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--store", store_uri, "--model-dir",
         str(tmp_path / "models"), "--port", "0", "--poll-interval", "0.2", "--grace", "5"],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True)
    reader.start()
    try:
        port = _listening_port(lines, proc)
        with ScorerClient(f"127.0.0.1:{port}", token="e2e-token") as client:
            deadline = time.monotonic() + 30
            while client.health() != "SERVING":
                assert time.monotonic() < deadline, "".join(lines)
                time.sleep(0.1)
            store = open_store(store_uri, readonly=True)
            try:
                for user in ("alice", "bob", "nobody"):
                    scores, name, version = client.score(user, ITEMS, CATS, timeout=5, request_id=f"e2e-{user}")
                    assert (name, version) == ("local", "1")
                    np.testing.assert_allclose(scores, direct_scores(ranker, store, user), rtol=1e-5, atol=1e-6)
            finally:
                store.close()
        score = subprocess.run(
            [sys.executable, "-m", "serving.cli", "score", "--target", f"127.0.0.1:{port}", "--user", "alice",
             "--item", "i1,i2,i3", "--category", "c1"],
            cwd=ROOT, env={**env, "CTRSTREAM_TOKEN": "e2e-token"}, capture_output=True, text=True, timeout=60,
        )
        assert score.returncode == 0, score.stderr
        out = json.loads(score.stdout)
        assert out["model_version"] == "1" and [s["item"] for s in out["scores"]] == ["i1", "i2", "i3"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    messages = [r["msg"] for r in records]
    assert "scorer stopping" in messages and messages[-1] == "scorer stopped"
    # structured logs: request ids reach the log lines of refused requests (none here) and
    # every line is JSON with a request_id field
    assert all("request_id" in r for r in records)
