"""Scorer process settings (STYLE R11): one frozen pydantic-settings model, defaults in one place.

Precedence: explicit values (command-line flags, a TOML file parsed by the entry point) over
environment variables ``CTRSTREAM_SERVE_<FIELD>`` (e.g. ``CTRSTREAM_SERVE_PORT=50052``,
``CTRSTREAM_SERVE_TOKENS=tok1,tok2``) over the defaults below. Nothing else in ``serving/`` reads
the environment.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["ServerConfig"]


class ServerConfig(BaseSettings):
    """Everything ``ctrstream serve`` can be told."""

    model_config = SettingsConfigDict(env_prefix="CTRSTREAM_SERVE_", frozen=True, extra="forbid")

    # -- what to serve
    store: str  # sequence store URI (lmdb:///path, redis://host:port/db, memory://)
    model_name: str | None = None  # MLflow registered model name (the registry source)
    model_dir: str | None = None  # a folder of saved rankers instead of MLflow (DirectoryModelSource)
    alias: str = "champion"  # registry alias (or alias file name) to follow
    tracking_uri: str | None = None  # MLflow URI; None: MLflow's own default (MLFLOW_TRACKING_URI)
    poll_interval_s: float = Field(10.0, gt=0)  # seconds between alias polls (hot reload)
    # -- network
    host: str = "127.0.0.1"  # bind address; loopback unless told otherwise
    port: int = Field(50051, ge=0, le=65535)  # 0 = ephemeral (tests)
    metrics_port: int | None = Field(None, ge=0, le=65535)  # Prometheus /metrics over HTTP; None = off
    metrics_host: str = "127.0.0.1"
    max_message_bytes: int = Field(4 << 20, ge=1024)  # max request and response size
    # -- capacity
    workers: int = Field(1, ge=1)  # scoring threads; torch parallelises inside each forward
    max_queue: int = Field(32, ge=0)  # admitted requests waiting for a worker; beyond: RESOURCE_EXHAUSTED
    # intra-op threads per process. 1 by default: the serving ops are small (one user, a few hundred
    # candidates), and on a busy 2-core host an OpenMP pool of 2 spends more time in barriers than
    # it saves (measured: a 360k-element multiply 8 ms with 2 threads under load vs 0.08 ms with 1).
    torch_threads: int = Field(1, ge=1)
    cache_mb: int = Field(256, ge=0)  # per-user encoding cache budget (0 = off)
    max_candidates: int = Field(2000, ge=1)  # per request
    min_deadline_ms: float = Field(2.0, ge=0)  # refuse (DEADLINE_EXCEEDED) with less time left than this
    # -- health
    max_model_age_s: float | None = Field(None, gt=0)  # `ranker` health NOT_SERVING past this model age
    max_poll_staleness_s: float | None = Field(None, gt=0)  # ... or with no good poll for this long
    # -- security
    tls_cert: str | None = None  # PEM server certificate chain; with tls_key enables TLS
    tls_key: str | None = None  # PEM private key
    tls_client_ca: str | None = None  # PEM CA bundle; set = mutual TLS (client certs required)
    tokens: Annotated[tuple[str, ...], NoDecode] = ()  # accepted bearer tokens; empty = no token auth
    token_file: str | None = None  # file with one accepted token per line (added to `tokens`)
    # -- lifecycle and logs
    grace_s: float = Field(10.0, ge=0)  # on SIGTERM: stop accepting, let in-flight RPCs finish this long
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    @field_validator("tokens", mode="before")
    @classmethod
    def _split_tokens(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(t.strip() for t in v.split(",") if t.strip())
        return v

    @model_validator(mode="after")
    def _check(self) -> ServerConfig:
        if (self.model_name is None) == (self.model_dir is None):
            raise ValueError("give exactly one of model_name (MLflow registry) or model_dir (a folder of rankers)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self

    def all_tokens(self) -> tuple[str, ...]:
        """``tokens`` plus the non-empty lines of ``token_file``."""
        extra: tuple[str, ...] = ()
        if self.token_file:
            with open(self.token_file, encoding="utf-8") as f:
                extra = tuple(line.strip() for line in f if line.strip())
        return self.tokens + extra

    @property
    def staleness_limit_s(self) -> float:
        """Seconds without a successful registry poll after which `ranker` health goes NOT_SERVING."""
        return self.max_poll_staleness_s if self.max_poll_staleness_s is not None else 5 * self.poll_interval_s
