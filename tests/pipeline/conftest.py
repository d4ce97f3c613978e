"""Fixtures of the pipeline tests: a real ``redis-server`` for the Redis store (session-scoped)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.broker import free_port

#: How long redis-server gets to answer PING after start; it is up in milliseconds when idle.
REDIS_START_TIMEOUT_S = 20.0


class RedisServer:
    """A throwaway redis-server on a free loopback port, no persistence, in its own directory."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def store_uri(self, namespace: str | None = None, **opts: object) -> str:
        """A store URI in a fresh namespace (tests share one server)."""
        q = {"namespace": namespace or "t" + uuid.uuid4().hex[:12], **opts}
        return self.url + "?" + "&".join(f"{k}={v}" for k, v in q.items())

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            why = "redis-server is not installed (run: bash infra/ensure-redis.sh)"
            if os.environ.get("REQUIRE_REDIS"):  # make test installs it: never skip the Redis backend there
                pytest.fail(why)
            pytest.skip(why)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        import redis

        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=1).ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; each test uses its own key namespace."""
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
