import pytest

from pipeline.cli import main
from pipeline.config import WorkerSettings, load_settings
from pipeline.exceptions import ConfigError


def test_precedence_cli_over_env_over_toml_over_default(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('group_id = "from-toml"\n[worker]\nmax_poll_records = 7\nstore = "lmdb:///toml"\n')
    s = load_settings(WorkerSettings, {}, cfg, "worker")
    assert (s.group_id, s.max_poll_records, s.store) == ("from-toml", 7, "lmdb:///toml")
    monkeypatch.setenv("CTRSTREAM_MAX_POLL_RECORDS", "9")
    assert load_settings(WorkerSettings, {}, cfg, "worker").max_poll_records == 9
    s = load_settings(WorkerSettings, {"max_poll_records": 11, "group_id": None}, cfg, "worker")
    assert s.max_poll_records == 11 and s.group_id == "from-toml"
    assert load_settings(WorkerSettings, {}).attribution_window_ms == 30 * 60 * 1000


def test_bad_setting_is_one_readable_line(capsys):
    with pytest.raises(ConfigError, match="max_poll_records"):
        load_settings(WorkerSettings, {"max_poll_records": -1})
    assert main(["worker", "--max-poll-records", "0", "--store", "memory://"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "max_poll_records" in err


def test_every_command_has_help(capsys):
    for cmd in ["demo", "broker", "produce", "worker", "train", "serve", "score", "store", "models", "evaluate"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0, cmd
        assert "usage: ctrstream" in capsys.readouterr().out
