"""CLI hooks (``add_serve_arguments``/``serve_command``, ``add_score_arguments``/``score_command``)
and the structured log format."""

from __future__ import annotations

import argparse
import json
import logging

import pytest

from serving._logging import JsonFormatter, RequestIdFilter
from serving.cli import _SERVE_FIELDS, add_score_arguments, add_serve_arguments, score_command, serve_command
from serving.config import ServerConfig
from serving.interceptors import request_id_var
from tests.serving.fixtures import build_test_ranker


def parse(add, argv):
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def test_every_serve_flag_maps_to_a_setting():
    fields = set(ServerConfig.model_fields)
    assert set(_SERVE_FIELDS) <= fields
    args = parse(add_serve_arguments, ["--store", "lmdb:///x", "--model-name", "ctr", "--port", "0",
                                       "--max-model-age", "60", "--grace", "3"])
    given = {k: getattr(args, k) for k in _SERVE_FIELDS if getattr(args, k) is not None}
    cfg = ServerConfig(**given)
    assert (cfg.store, cfg.model_name, cfg.port, cfg.max_model_age_s, cfg.grace_s) == ("lmdb:///x", "ctr", 0, 60, 3)
    assert cfg.host == "127.0.0.1" and cfg.alias == "champion"


def test_serve_flags_fall_back_to_environment(monkeypatch):
    monkeypatch.setenv("CTRSTREAM_SERVE_STORE", "memory://")
    monkeypatch.setenv("CTRSTREAM_SERVE_MODEL_NAME", "ctr")
    monkeypatch.setenv("CTRSTREAM_SERVE_TOKENS", "a, b")
    cfg = ServerConfig(port=1234)
    assert (cfg.store, cfg.model_name, cfg.port, cfg.tokens) == ("memory://", "ctr", 1234, ("a", "b"))


def test_serve_command_rejects_bad_settings(capsys):
    args = parse(add_serve_arguments, ["--store", "memory://"])  # neither --model-name nor --model-dir
    assert serve_command(args) == 2
    assert "exactly one of model_name" in capsys.readouterr().err


def test_score_command(make_store, model_dir, start_server, capsys):
    model_dir.publish(build_test_ranker("din"), "5")
    running = start_server(store=make_store(), source=model_dir.source, tokens=("tok",))
    args = parse(add_score_arguments, ["--target", running.target, "--user", "alice", "--item", "i1,i2",
                                       "--category", "c1,c2"])
    assert score_command(args) == 1  # no token
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CTRSTREAM_TOKEN", "tok")
        assert score_command(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_name"] == "ctr" and out["model_version"] == "5"
    assert [s["item"] for s in out["scores"]] == ["i1", "i2"] and all(0 < s["score"] < 1 for s in out["scores"])


def test_json_logs_carry_the_request_id():
    record = logging.LogRecord("serving.x", logging.WARNING, __file__, 1, "request refused", None, None)
    record.code = "INVALID_ARGUMENT"
    token = request_id_var.set("req-7")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    line = json.loads(JsonFormatter().format(record))
    assert line["request_id"] == "req-7" and line["code"] == "INVALID_ARGUMENT"
    assert line["msg"] == "request refused" and line["level"] == "WARNING"
