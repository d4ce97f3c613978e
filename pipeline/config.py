"""Process settings: typed, frozen, validated at start-up (STYLE R11).

Precedence, highest first: command-line flags, ``CTRSTREAM_*`` environment variables, a TOML file
(``--config``; its ``[worker]``/``[trainer]``/``[serve]``… table, or top-level keys), then the
defaults declared here. Defaults live in one place: these classes. A bad value fails at start-up
with ONE readable line (:func:`load_settings` raises :class:`ConfigError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import tomllib
from pydantic import AliasChoices, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.checkpoint import DEFAULT_COMMIT_INTERVAL_MS, DEFAULT_COMMIT_MAX_EVENTS
from pipeline.exceptions import ConfigError

__all__ = ["CommonSettings", "WorkerSettings", "ProduceSettings", "TrainerSettings", "load_settings", "DEFAULT_STORE"]

DEFAULT_STORE = "lmdb://./.ctrstream/store"
S = TypeVar("S", bound=BaseSettings)


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CTRSTREAM_", frozen=True, extra="forbid")

    bootstrap_servers: str = "127.0.0.1:9092"  # Kafka bootstrap (host:port[,host:port])
    events_topic: str = "events"  # raw events, key = user id
    samples_topic: str = "samples"  # labeled samples published by the worker
    dlq_topic: str = "events.dlq"  # rejected events with reasons
    kafka_client: Literal["kafka-python", "confluent"] = "kafka-python"  # client library


class WorkerSettings(CommonSettings):
    store: str = DEFAULT_STORE  # lmdb:///path | redis://host:port/db
    group_id: str = "ctrstream-worker"  # consumer group (partitions are spread over its members)
    attribution_window_ms: int = Field(30 * 60 * 1000, gt=0)  # a click counts within this event time
    allowed_lateness_ms: int = Field(5_000, ge=0)  # watermark = max event time seen - this
    max_poll_records: int = Field(5_000, gt=0)  # records per poll batch
    # The open checkpoint (pipeline/checkpoint.py) is committed (producer flush, one atomic store
    # commit with the offsets, then the broker's offsets) every commit_max_events records or every
    # commit_interval_ms, whichever comes first, and at once on SIGTERM, revoke and idle exit.
    # commit_interval_ms=0 or commit_max_events=1 commits every poll batch. Upper bounds: a longer
    # interval would replay minutes of stream after a crash; a larger checkpoint holds its appends in
    # memory (~30 bytes per event). How the defaults were chosen: pipeline/checkpoint.py.
    commit_interval_ms: int = Field(DEFAULT_COMMIT_INTERVAL_MS, ge=0, le=600_000)  # max time between commits
    commit_max_events: int = Field(DEFAULT_COMMIT_MAX_EVENTS, gt=0, le=10_000_000)  # max records per commit
    poll_timeout_ms: int = Field(500, gt=0)  # how long one poll waits for records
    exit_when_idle: float | None = Field(None, gt=0)  # stop after this many seconds with no record
    drain_on_exit: bool = False  # on idle exit, label every pending impression (bounded replays)
    max_poll_interval_ms: int = Field(300_000, gt=0)  # Kafka group liveness; tests lower it
    session_timeout_ms: int = Field(10_000, gt=0)  # Kafka group session timeout
    lifelong_cap: int = Field(100_000, gt=0)  # behaviors kept per user
    fetch_process: bool = True  # kafka-python: its consume runs in a child process (pipeline/_fetch_process.py)
    # a commit that falls due runs in a background thread while the next batches are processed (at most
    # one in flight; pipeline/worker.py StreamWorker.commit)
    background_commit: bool = True
    metrics_port: int | None = Field(None, ge=0, le=65535)  # Prometheus /metrics over HTTP (pipeline/metrics.py); None = off
    metrics_host: str = "127.0.0.1"  # address the metrics server binds


class ProduceSettings(CommonSettings):
    partitions: int = Field(4, gt=0)  # partitions of the events topic when it is created
    limit: int | None = Field(None, gt=0)  # stop after this many events


class TrainerSettings(CommonSettings):
    store: str = DEFAULT_STORE  # the worker's sequence store (read-only here)
    models: str = "din,sdim"  # comma-separated presets trained side by side on the same samples
    group_id: str = "ctrstream-trainer"  # consumer group on the samples topic
    batch_size: int = Field(256, gt=0)  # samples per step
    lr: float = Field(2e-3, gt=0)  # Adam learning rate
    seq_len: int = Field(1000, gt=0)  # history read for long-sequence models
    short_len: int = Field(50, gt=0)  # history read for `din` (the last N)
    item_buckets: int = Field(1 << 18, gt=1)  # item embedding rows
    category_buckets: int = Field(1 << 12, gt=1)  # category embedding rows
    tracking_uri: str | None = None  # MLflow; default: MLFLOW_TRACKING_URI, else .ctrstream/mlflow.db
    experiment: str = "ctrstream-online"  # MLflow experiment
    registered_prefix: str = "ctrstream-"  # registered model name = prefix + preset
    checkpoint_every: int = Field(5000, gt=0)  # samples between registry versions
    window: int = Field(2000, gt=10)  # samples in the sliding metric / promotion window
    promotion_margin: float = Field(0.0, ge=0)  # AUC the challenger must beat the champion by
    exit_when_idle: float | None = Field(None, gt=0)  # stop after this many seconds without samples
    seed: int = 0  # model initialisation seed
    store_wait_s: float = Field(30.0, ge=0)  # wait this long for the store to reach a sample's seq_pos
    checkpoint_dir: str = ".ctrstream/trainer"  # crash-safe state: models, optimizers, windows, offsets
    state_every: int = Field(1000, gt=0)  # samples between crash-safe state saves
    # Data parallel (docs/training.md "Scale-out"). torchrun's variables are read too (they win over
    # the CTRSTREAM_ ones; flags win over both).
    world_size: int = Field(1, gt=0, validation_alias=AliasChoices(
        "world_size", "WORLD_SIZE", "CTRSTREAM_WORLD_SIZE"))  # trainer processes (ranks) in the group
    rank: int = Field(0, ge=0, validation_alias=AliasChoices(
        "rank", "RANK", "CTRSTREAM_RANK"))  # this process: consumes partitions p with p % world_size == rank
    local_rank: int = Field(0, ge=0, validation_alias=AliasChoices(
        "local_rank", "LOCAL_RANK", "CTRSTREAM_LOCAL_RANK"))  # GPU index on this host (nccl only)
    dist_init: str | None = None  # tcp://HOST:PORT of rank 0; default env:// (MASTER_ADDR/MASTER_PORT)
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl when CUDA is available, else gloo
    dist_timeout_s: float = Field(600.0, gt=0)  # how long a collective waits for the other ranks
    metrics_port: int | None = Field(None, ge=0, le=65535)  # Prometheus /metrics (rank 0); None = off
    metrics_host: str = "127.0.0.1"  # address the metrics server binds

    @model_validator(mode="after")
    def _rank_in_world(self) -> TrainerSettings:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is not below world_size {self.world_size}")
        return self


def load_settings(cls: type[S], cli: dict[str, Any], config: str | Path | None = None,
                  section: str | None = None) -> S:
    """Build ``cls`` from CLI values (None = not given), env vars, an optional TOML file, defaults."""
    toml_vals: dict[str, Any] = {}
    if config:
        try:
            data = tomllib.loads(Path(config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read config file {config}: {e}") from None
        toml_vals = {k: v for k, v in data.items() if not isinstance(v, dict)}
        if section and isinstance(data.get(section), dict):
            toml_vals.update(data[section])
        names = set(cls.model_fields)
        toml_vals = {k.replace("-", "_"): v for k, v in toml_vals.items() if k.replace("-", "_") in names}

    class _WithToml(cls):  # type: ignore[valid-type,misc]
        @classmethod
        def settings_customise_sources(cls_, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                       env_settings: PydanticBaseSettingsSource, *_: Any,
                                       **__: Any) -> tuple[Any, ...]:
            return init_settings, env_settings, InitSettingsSource(settings_cls, toml_vals)

    given = {k: v for k, v in cli.items() if v is not None and k in cls.model_fields}
    try:
        merged = _WithToml(**given)
        return cls.model_validate(merged.model_dump())
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "settings"
        raise ConfigError(f"invalid setting '{loc}': {err['msg']} (got {err.get('input')!r:.60})") from None
