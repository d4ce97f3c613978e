"""A small synchronous client for the scorer (used by ``ctrstream score`` and the benchmark).

Example::

    with ScorerClient("127.0.0.1:50051") as client:
        scores, name, version = client.score("user-1", ["i1", "i2"], ["c1", "c2"], timeout=0.1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.proto import scorer_pb2, scorer_pb2_grpc

__all__ = ["ScorerClient", "TlsConfig"]


@dataclass(frozen=True)
class TlsConfig:
    """Client TLS material (PEM bytes). ``root_ca`` verifies the server (None: system roots);
    ``cert_chain`` + ``private_key`` authenticate the client for mutual TLS."""

    root_ca: bytes | None = None
    private_key: bytes | None = None
    cert_chain: bytes | None = None
    server_name: str | None = None  # override the name checked against the certificate

    @staticmethod
    def from_files(root_ca: str | None = None, cert: str | None = None, key: str | None = None,
                   server_name: str | None = None) -> TlsConfig:
        def read(p: str | None) -> bytes | None:
            if p is None:
                return None
            with open(p, "rb") as f:
                return f.read()

        return TlsConfig(read(root_ca), read(key), read(cert), server_name)


class ScorerClient:
    """Blocking client of ``ctrstream.v1.Scorer``.

    Args:
        target (str): ``host:port``.
        token (str | None, default None): bearer token sent with every call.
        tls (TlsConfig | None, default None): None = plaintext channel.
        max_message_bytes (int, default 4 MiB): channel message size limit.
    """

    def __init__(self, target: str, token: str | None = None, tls: TlsConfig | None = None,
                 max_message_bytes: int = 4 << 20) -> None:
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls is not None:
            if tls.server_name:
                options.append(("grpc.ssl_target_name_override", tls.server_name))
            creds = grpc.ssl_channel_credentials(tls.root_ca, tls.private_key, tls.cert_chain)
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self._stub = scorer_pb2_grpc.ScorerStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()

    def score(
        self,
        user_id: str,
        items: Sequence[str],
        categories: Sequence[str],
        timeout: float | None = 1.0,
        request_id: str | None = None,
        context: dict[str, str] | None = None,
    ) -> tuple[list[float], str, str]:
        """Scores in candidate order, model name, model version. Raises ``grpc.RpcError``."""
        request = scorer_pb2.ScoreRequest(
            user_id=user_id,
            candidates=[scorer_pb2.Candidate(item_id=i, category_id=c) for i, c in zip(items, categories, strict=True)],
            context=context or {},
        )
        metadata = self._metadata + ((("x-request-id", request_id),) if request_id else ())
        response = self._stub.Score(request, timeout=timeout, metadata=metadata)
        return list(response.scores), response.model_name, response.model_version

    def score_request(self, request: scorer_pb2.ScoreRequest, timeout: float | None = 1.0
                      ) -> tuple[scorer_pb2.ScoreResponse, grpc.Call]:
        """Send a prepared request (benchmarks, tests); returns the response and the call (metadata)."""
        return self._stub.Score.with_call(request, timeout=timeout, metadata=self._metadata)  # type: ignore[no-any-return]

    def health(self, service: str = "", timeout: float | None = 1.0) -> str:
        """The health status name of ``service`` ("SERVING", "NOT_SERVING", ...)."""
        resp = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel connects (not until the model is loaded: see :meth:`health`)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ScorerClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
