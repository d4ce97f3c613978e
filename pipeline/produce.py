"""Replay a dataset into the ``events`` topic, in event-time order, keyed by user."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pipeline.broker import create_topics
from pipeline.config import ProduceSettings
from pipeline.events import encode_event, user_key
from pipeline.kafka import make_producer

__all__ = ["produce_events", "iter_dataset"]


def iter_dataset(name: str, *, seed: int = 7, **options: Any) -> Iterator[dict[str, Any]]:
    """Events of a named dataset: ``synthetic``, ``movielens``, ``taobao``, ``amazon``, or a file path."""
    if name == "synthetic":
        from pipeline.datasets.synthetic import SyntheticConfig, generate

        yield from generate(SyntheticConfig(seed=seed, **options)).events
        return
    import importlib

    if name in ("movielens", "taobao", "amazon"):
        mod = importlib.import_module(f"pipeline.datasets.{name}")
        yield from mod.iter_events(**options)
        return
    from pathlib import Path

    p = Path(name)
    if p.exists():
        if p.suffix in (".csv", ".parquet") and "taobao" in p.name.lower() or p.suffix == ".csv":
            mod = importlib.import_module("pipeline.datasets.taobao")
            yield from mod.iter_events(path=str(p), **options)
            return
    raise ValueError(f"unknown dataset {name!r}: use synthetic, movielens, taobao, amazon, or a CSV path")


def produce_events(settings: ProduceSettings, events: Iterable[dict[str, Any]],
                   progress: Callable[[int], None] | None = None) -> int:
    """Send events to ``settings.events_topic`` (created with ``settings.partitions`` if missing)."""
    create_topics(settings.bootstrap_servers, {settings.events_topic: settings.partitions,
                                               settings.samples_topic: settings.partitions,
                                               settings.dlq_topic: 1})
    producer = make_producer(settings.kafka_client, settings.bootstrap_servers)
    n = 0
    try:
        for ev in events:
            if settings.limit is not None and n >= settings.limit:
                break
            producer.send(settings.events_topic, user_key(ev["user_id"]), encode_event(ev))
            n += 1
            if progress and n % 5000 == 0:
                progress(n)
        producer.flush()
    finally:
        producer.close()
    if progress:
        progress(n)
    return n
