"""infra/: the compose stack cannot run here (no Docker daemon, no image registry), so this checks
what can be checked without one: every ctrstream command in compose.yaml parses with the real CLI
and its settings load from infra/ctrstream.toml; Prometheus scrapes the ports the services serve
/metrics on; the image pins the torch the Makefile pins; and the MLflow server, started with the
compose command's flags, accepts the Host header the trainer and scorer send inside the network."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml  # PyYAML: a dependency of MLflow

from pipeline.broker import free_port
from pipeline.cli import _settings, build_parser
from pipeline.config import ProduceSettings, TrainerSettings, WorkerSettings
from tests.models.test_online import trainer  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
CONFIG_IN_CONTAINER = "/etc/ctrstream/ctrstream.toml"


def _compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def _ctrstream_argv(service: str) -> list[str]:
    """The arguments after ``ctrstream`` of a service run from the ctrstream image, the config path
    mapped to the repository's file."""
    svc = _compose()["services"][service]
    assert svc["image"] == "ctrstream:dev" and "entrypoint" not in svc
    return [str(INFRA / "ctrstream.toml") if a == CONFIG_IN_CONTAINER else a for a in svc["command"]]


def _loaded(service: str, cls: type, section: str) -> Any:
    argv = _ctrstream_argv(service)
    args = build_parser(argv[0]).parse_args(argv)
    return _settings(cls, args, section)


def test_the_services_commands_parse_and_their_settings_load():
    topics = _loaded("topics", ProduceSettings, "produce")
    worker = _loaded("worker", WorkerSettings, "worker")
    trainer_s = _loaded("trainer", TrainerSettings, "trainer")
    assert topics.bootstrap_servers == worker.bootstrap_servers == trainer_s.bootstrap_servers == "kafka:9092"
    assert worker.store == trainer_s.store and worker.store.startswith("redis://redis:6379/")
    assert trainer_s.tracking_uri == "http://mlflow:5000" and trainer_s.checkpoint_dir.startswith("/data/")
    from serving.cli import _SERVE_FIELDS
    from serving.config import ServerConfig

    argv = _ctrstream_argv("scorer")
    args = build_parser("serve").parse_args(argv)
    scorer = ServerConfig(**{k: getattr(args, k) for k in _SERVE_FIELDS if getattr(args, k, None) is not None})
    assert scorer.store == worker.store and scorer.tracking_uri == trainer_s.tracking_uri
    assert scorer.model_name is not None and scorer.model_name.startswith(trainer_s.registered_prefix)
    assert scorer.model_name.removeprefix(trainer_s.registered_prefix) in trainer_s.models.split(",")
    # every service's /metrics is reachable from Prometheus (not on loopback inside its container)
    assert worker.metrics_host == trainer_s.metrics_host == scorer.metrics_host == "0.0.0.0"
    prom = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    ports = {}
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            ports[job["job_name"]] = (sd["names"], sd["port"])
        for st in job.get("static_configs", []):
            host, port = st["targets"][0].split(":")
            ports[job["job_name"]] = ([host], int(port))
    assert ports == {"ctrstream-worker": (["worker"], worker.metrics_port),
                     "ctrstream-trainer": (["trainer"], trainer_s.metrics_port),
                     "ctrstream-scorer": (["scorer"], scorer.metrics_port)}
    # published ports bind loopback only
    for name, svc in _compose()["services"].items():
        for p in svc.get("ports", []):
            assert p.startswith("127.0.0.1:"), (name, p)


def test_the_image_pins_the_torch_the_makefile_pins():
    pin = re.search(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text())
    image = re.search(r"torch==([0-9.]+)", (INFRA / "Dockerfile").read_text())
    assert pin and image and pin.group(1) == image.group(1)


def _get(port: int, host_header: str) -> int:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                                 headers={"Host": host_header})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.mark.slow
def test_the_mlflow_server_of_the_stack_accepts_the_in_network_host_header(tmp_path):
    svc = _compose()["services"]["mlflow"]
    assert svc["entrypoint"] == ["mlflow", "server"]
    cmd = list(svc["command"])
    port = free_port()
    cmd[cmd.index("--host") + 1] = "127.0.0.1"  # the flags of the stack, on loopback and local paths here
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--backend-store-uri") + 1] = f"sqlite:///{tmp_path}/mlflow.db"
    cmd[cmd.index("--artifacts-destination") + 1] = str(tmp_path / "artifacts")
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    assert mlflow is not None
    # its own session: `mlflow server` starts a web server and job consumers, all stopped with the group
    proc = subprocess.Popen([mlflow, "server", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                status = _get(port, "mlflow:5000")
                break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None and time.monotonic() < deadline, "the MLflow server did not start"
                time.sleep(0.5)
        assert status == 200  # what the trainer and scorer send inside the compose network
        assert _get(port, "attacker.example:5000") in (400, 403)  # the check is on: the flag is what admits it
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        deadline = time.monotonic() + 15
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _exported_names(online: Any) -> set[str]:
    """Every sample name the worker, trainer and scorer registries expose (a histogram's _bucket,
    _sum and _count included), from each module's own registry and collector."""
    from prometheus_client import CollectorRegistry

    names: set[str] = set()

    def add(registry: CollectorRegistry) -> None:
        for fam in registry.collect():
            names.update(s.name for s in fam.samples)
            names.add(fam.name)

    from pipeline.metrics import WorkerMetrics
    from tests.pipeline.test_worker import feed, make_worker

    w = make_worker()
    wm = WorkerMetrics(w)
    wm.observe_batch(0.01)
    feed(w, [{"type": "behavior", "user_id": 1, "item_id": 2, "ts": 1_767_225_600_000}])  # a partition, a commit
    add(wm.registry)
    from models.trainer_metrics import TrainerMetrics
    from tests.models.test_online import _samples

    online.learn(_samples(32))  # a step: the window metrics
    online.checkpoint()  # a version, and the champion
    add(TrainerMetrics(online).registry)
    from serving.metrics import ScorerMetrics

    sm = ScorerMetrics(lambda: None)
    sm.observe_rpc("Score", "OK", 0.01)
    sm.reload_failed()
    add(sm.registry)
    return names


def test_the_alert_rules_name_only_metrics_the_services_export(trainer):  # noqa: F811 - the fixture
    rules = yaml.safe_load((INFRA / "alerts.yml").read_text())
    prom = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    mounts = _compose()["services"]["prometheus"]["volumes"]
    assert "./alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    exported = _exported_names(trainer)
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert rule["alert"] and rule["expr"] and rule["annotations"]["summary"]
            used |= set(re.findall(r"\bctrstream_[a-z_]+", rule["expr"]))
    assert used and used <= exported, sorted(used - exported)
