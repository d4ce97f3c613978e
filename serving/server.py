"""Build, run and stop the scorer's gRPC server (grpc.aio).

Lifecycle (STYLE R14):

1. ``start``: health reports NOT_SERVING for ``""``, ``ctrstream.v1.Scorer`` and ``ranker``; the
   port is bound (loopback by default, TLS / mutual TLS when configured) and reflection is on.
2. A background task opens the sequence store (retrying: the worker may not have created it yet),
   polls the model source, loads + warms up + swaps new versions, and updates health:
   ``""``/``ctrstream.v1.Scorer`` are SERVING once a model and the store are ready; ``ranker`` is
   SERVING only while the model is also fresh (its age is within ``max_model_age_s``, and the
   source was polled successfully within ``max_poll_staleness_s``).
3. ``stop`` (SIGTERM/SIGINT in :func:`serve`): every health status goes NOT_SERVING, new RPCs are
   refused, in-flight ones get ``grace_s`` to finish, then the process exits 0.

Score requests pass ``RequestId -> Metrics -> BearerTokenAuth -> ExceptionToStatus`` interceptors,
then an :class:`~serving.servicer.AdmissionGate` (``workers + max_queue`` requests at once, the next
is answered RESOURCE_EXHAUSTED), then a pool of ``workers`` scoring threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import grpc.aio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from pipeline.state import SequenceStore, open_store
from serving.config import ServerConfig
from serving.interceptors import (
    BearerTokenAuthInterceptor,
    ExceptionToStatusInterceptor,
    MetricsInterceptor,
    RequestIdInterceptor,
)
from serving.metrics import ScorerMetrics
from serving.model_source import DirectoryModelSource, MlflowModelSource, ModelReloader, ModelSource
from serving.proto import scorer_pb2, scorer_pb2_grpc
from serving.scorer import Scorer
from serving.servicer import AdmissionGate, RequestLimits, ScorerServicer

__all__ = ["RANKER_HEALTH_SERVICE", "SCORER_SERVICE", "ScorerServer", "ServerThread", "build_source", "serve"]

log = logging.getLogger(__name__)

SCORER_SERVICE = scorer_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name  # "ctrstream.v1.Scorer"
RANKER_HEALTH_SERVICE = "ranker"  # model loaded AND fresh
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

T = TypeVar("T")


def build_source(config: ServerConfig) -> ModelSource:
    if config.model_dir is not None:
        return DirectoryModelSource(config.model_dir, name=config.model_name or "local", alias=config.alias)
    assert config.model_name is not None  # guaranteed by ServerConfig validation
    return MlflowModelSource(config.model_name, alias=config.alias, tracking_uri=config.tracking_uri)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class ScorerServer:
    """The scorer process minus signal handling (see :func:`serve`, :class:`ServerThread`).

    Args:
        config (ServerConfig): settings.
        store (SequenceStore | None, default None): an already open store (tests); None opens
            ``config.store`` read-only in the background (and this server closes it).
        source (ModelSource | None, default None): None builds one from ``config``.
    """

    def __init__(
        self, config: ServerConfig, *, store: SequenceStore | None = None, source: ModelSource | None = None
    ) -> None:
        self.config = config
        self._owns_store = store is None
        self.scorer = Scorer(store, cache_bytes=config.cache_mb << 20, min_budget_s=config.min_deadline_ms / 1000)
        self.source = source if source is not None else build_source(config)
        self.metrics = ScorerMetrics(lambda: self.scorer.model)
        self.reloader = ModelReloader(self.scorer, self.source, config.poll_interval_s,
                                      on_change=self.metrics.model_changed)
        self.health = HealthServicer()
        self.store_ok = store is not None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._score_pool = concurrent.futures.ThreadPoolExecutor(config.workers, thread_name_prefix="score")
        self._admin_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reload")
        self._poll_task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._last_store_error: str | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until ready); returns the bound port."""
        self._ready = asyncio.Event()  # bound to the running loop
        cfg = self.config
        for service in ("", SCORER_SERVICE, RANKER_HEALTH_SERVICE):
            await self.health.set(service, _NOT_SERVING)
        interceptors: list[grpc.aio.ServerInterceptor] = [
            RequestIdInterceptor(),
            MetricsInterceptor(self.metrics.observe_rpc),
        ]
        tokens = cfg.all_tokens()
        if tokens:
            interceptors.append(BearerTokenAuthInterceptor(tokens))
        interceptors.append(ExceptionToStatusInterceptor())
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a taken port is an error, not a silent share
            ],
        )
        servicer = ScorerServicer(
            self.scorer,
            self._score_pool,
            AdmissionGate(cfg.workers + cfg.max_queue),
            RequestLimits(max_candidates=cfg.max_candidates),
            self.metrics,
        )
        scorer_pb2_grpc.add_ScorerServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SCORER_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )
        address = _address(cfg.host, cfg.port)
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            creds = grpc.ssl_server_credentials(
                [(_read(cfg.tls_key), _read(cfg.tls_cert))],
                root_certificates=_read(cfg.tls_client_ca) if cfg.tls_client_ca else None,
                require_client_auth=cfg.tls_client_ca is not None,
            )
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        self._server = server
        if cfg.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_host)
        log.info(
            "scorer listening",
            extra={"address": _address(cfg.host, self.port), "tls": cfg.tls_cert is not None,
                   "mutual_tls": cfg.tls_client_ca is not None, "token_auth": bool(tokens),
                   "source": self.source.describe(), "metrics_port": self.metrics_port,
                   "workers": cfg.workers, "max_queue": cfg.max_queue},
        )
        self._poll_task = asyncio.create_task(self._poll_loop(), name="scorer-refresh")
        return self.port

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until a model and the store are ready (health SERVING)."""
        await asyncio.wait_for(self._ready.wait(), timeout)

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new RPCs, give in-flight ones ``grace`` seconds, release all."""
        grace = self.config.grace_s if grace is None else grace
        log.info("scorer stopping", extra={"grace_s": grace})
        await self.health.enter_graceful_shutdown()
        if self._poll_task is not None:
            self._poll_task.cancel()
            try:
                await self._poll_task
            except asyncio.CancelledError:
                pass
            self._poll_task = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        self._score_pool.shutdown(wait=True)
        self._admin_pool.shutdown(wait=True)
        self.metrics.close()
        if self._owns_store and self.scorer.store is not None:
            self.scorer.store.close()
            self.scorer.store = None
        log.info("scorer stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    # ---- background refresh ------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the loop die; health shows what is wrong
                log.error("refresh failed", exc_info=True)
            await asyncio.sleep(self.config.poll_interval_s)

    async def refresh(self) -> None:
        """One round: open/probe the store, follow the model alias, publish health."""
        loop = asyncio.get_running_loop()
        self.store_ok = await loop.run_in_executor(self._admin_pool, self._check_store)
        failures = self.reloader.failures
        await loop.run_in_executor(self._admin_pool, self.reloader.check_once)
        if self.reloader.failures > failures:
            self.metrics.reload_failed()
        self.metrics.set_cache_bytes(self.scorer.cache.nbytes)
        await self._publish_health()

    def _check_store(self) -> bool:
        try:
            if self.scorer.store is None:
                self.scorer.store = open_store(self.config.store, readonly=True)
                log.info("sequence store open", extra={"store": self.config.store.split("?")[0]})
            self.scorer.store.length(0)  # probe (a remote store may be down)
        except Exception as exc:
            if str(exc) != self._last_store_error:
                log.warning("sequence store not ready", extra={"reason": str(exc)})
            self._last_store_error = str(exc)
            return False
        self._last_store_error = None
        return True

    def model_fresh(self) -> bool:
        model = self.scorer.model
        if model is None:
            return False
        if self.config.max_model_age_s is not None and model.age_s() > self.config.max_model_age_s:
            return False
        since = self.reloader.seconds_since_success()
        return since is not None and since <= self.config.staleness_limit_s

    async def _publish_health(self) -> None:
        ready = self.scorer.model is not None and self.store_ok
        status = _SERVING if ready else _NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SCORER_SERVICE, status)
        await self.health.set(RANKER_HEALTH_SERVICE, _SERVING if ready and self.model_fresh() else _NOT_SERVING)
        if ready:
            self._ready.set()
        else:
            self._ready.clear()


async def _serve_until_signal(config: ServerConfig) -> int:
    server = ScorerServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    return 0


def serve(config: ServerConfig) -> int:
    """Run the scorer in the foreground until SIGTERM/SIGINT; returns the exit code (0 = clean)."""
    torch.set_num_threads(config.torch_threads)
    try:
        torch.set_num_interop_threads(1)  # no inter-op parallelism in a forward pass here
    except RuntimeError:  # already set (an embedding program ran torch before)
        pass
    return asyncio.run(_serve_until_signal(config))


class ServerThread:
    """Runs a :class:`ScorerServer` on an event loop in a background thread (tests, benchmarks,
    embedding the scorer in a synchronous program)."""

    def __init__(self, server: ScorerServer) -> None:
        self.server = server
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self, wait_ready: float | None = 30.0) -> int:
        """Start; wait (up to ``wait_ready`` s, None = don't wait) for health SERVING; return the port."""
        self._thread = threading.Thread(target=self._run, name="scorer-loop", daemon=True)
        self._thread.start()
        self._started.wait(60)
        if self._error is not None:
            raise RuntimeError("scorer failed to start") from self._error
        assert self.server.port is not None
        if wait_ready is not None:
            self.call(self.server.wait_ready(wait_ready))
        return self.server.port

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self.server.start())
        except BaseException as exc:
            self._error = exc
            self._started.set()
            loop.close()
            return
        self._started.set()
        loop.run_forever()
        loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 60) -> T:
        """Run ``coro`` on the server's loop and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace: float | None = None) -> None:
        if self._loop is None or self._thread is None:
            return
        self.call(self.server.stop(grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop = None
        self._thread = None
