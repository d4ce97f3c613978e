"""The event contract (DESIGN.md §3): decode, validate, and route bad records to the DLQ.

Events are JSON objects on topic ``events`` keyed by user id. Decoding works on whole batches and
returns columnar arrays for the worker's hot path plus one :class:`DeadLetter` per rejected record;
a bad record never raises out of :func:`decode_batch`.

Ids (user, item, category) are hashed with xxh3_64 of their string form to 63-bit integers, so
``42`` and ``"42"`` are the same id. The hash is stable across processes and machines; models
fold it into sized embedding tables (``models.features``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

__all__ = [
    "ACTIONS",
    "EVENT_TYPES",
    "MAX_EVENT_BYTES",
    "DeadLetter",
    "DecodedBatch",
    "RawRecord",
    "decode_batch",
    "encode_event",
    "hash_id",
]

#: Behavior kinds, as stored (uint8). 0 is reserved for padding in model inputs.
ACTIONS: dict[str, int] = {"view": 1, "click": 2, "cart": 3, "fav": 4, "buy": 5, "other": 6}
#: Event types, as decoded.
EVENT_TYPES: dict[str, int] = {"behavior": 0, "impression": 1, "click": 2}
BEHAVIOR, IMPRESSION, CLICK = 0, 1, 2

#: Larger messages are rejected: a behavior event is ~150 bytes; 64 KiB leaves room for context
#: maps while keeping one hostile record from bloating a batch.
MAX_EVENT_BYTES = 64 * 1024
#: Ids longer than this are rejected (they are hashed anyway; a 1 MB "id" is an attack or a bug).
MAX_ID_CHARS = 256
#: Event time must fall in [2000-01-01, 2100-01-01) in ms: catches seconds-vs-ms mix-ups and garbage.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 4_102_444_800_000

_KNOWN = {"type", "user_id", "item_id", "category_id", "action", "ts", "request_id", "context"}
_MASK63 = (1 << 63) - 1


def hash_id(value: str | int) -> int:
    """Stable 63-bit id of a user, item or category (xxh3_64 of its string form)."""
    return xxhash.xxh3_64_intdigest(str(value).encode()) & _MASK63


@dataclass(frozen=True)
class RawRecord:
    """One record as consumed: where it came from and its bytes."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class DeadLetter:
    """A rejected record: original bytes, source position and the reason, for ``events.dlq``."""

    record: RawRecord
    reason: str

    def to_json(self) -> bytes:
        r = self.record
        return json.dumps(
            {
                "reason": self.reason,
                "topic": r.topic,
                "partition": r.partition,
                "offset": r.offset,
                "key_hex": r.key.hex() if r.key is not None else None,
                "value_hex": r.value.hex() if r.value is not None else None,
            }
        ).encode()


@dataclass
class DecodedBatch:
    """Valid events of one batch, columnar, in input order."""

    kind: np.ndarray  # (n,) uint8: EVENT_TYPES
    user: np.ndarray  # (n,) int64 hashed
    item: np.ndarray  # (n,) int64 hashed
    category: np.ndarray  # (n,) int64 hashed, 0 when absent
    action: np.ndarray  # (n,) uint8: ACTIONS
    ts: np.ndarray  # (n,) int64 ms
    request_id: list[str | None]  # (n,)
    user_raw: list[str]  # (n,) original user id as a string (for samples)
    item_raw: list[str]  # (n,) original item id
    cat_raw: list[str]  # (n,) original category id ("" when absent)
    partition: np.ndarray  # (n,) int32 source partition
    offset: np.ndarray  # (n,) int64 source offset
    context: list[dict[str, Any] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.kind.shape[0])


class _Invalid(ValueError):
    pass


def _id_field(obj: dict[str, Any], name: str, required: bool) -> str | None:
    v = obj.get(name)
    if v is None:
        if required:
            raise _Invalid(f"missing field '{name}'")
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise _Invalid(f"field '{name}' must be a string or integer, got {type(v).__name__}")
    s = str(v)
    if not s:
        raise _Invalid(f"field '{name}' is empty")
    if len(s) > MAX_ID_CHARS:
        raise _Invalid(f"field '{name}' is longer than {MAX_ID_CHARS} characters")
    return s


def _validate(obj: Any) -> tuple[int, str, str, str | None, int, int, str | None, dict[str, Any] | None]:
    if not isinstance(obj, dict):
        raise _Invalid(f"event must be a JSON object, got {type(obj).__name__}")
    t = obj.get("type")
    if not isinstance(t, str) or t not in EVENT_TYPES:
        raise _Invalid(f"field 'type' must be one of {sorted(EVENT_TYPES)}, got {t!r:.40}")
    kind = EVENT_TYPES[t]
    user = _id_field(obj, "user_id", True)
    item = _id_field(obj, "item_id", True)
    cat = _id_field(obj, "category_id", kind == IMPRESSION)
    action_name = obj.get("action", "click" if kind == CLICK else "view")
    if not isinstance(action_name, str) or len(action_name) > 32:
        raise _Invalid("field 'action' must be a short string")
    action = ACTIONS.get(action_name, ACTIONS["other"])
    ts = obj.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        raise _Invalid(f"field 'ts' must be an integer (ms since epoch), got {type(ts).__name__}")
    if isinstance(ts, float):
        if not math.isfinite(ts) or ts != int(ts):
            raise _Invalid("field 'ts' must be an integer (ms since epoch)")
        ts = int(ts)
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        raise _Invalid(f"field 'ts' out of range [2000-01-01, 2100-01-01) in ms: {ts}")
    rid = obj.get("request_id")
    if kind != BEHAVIOR:
        if not isinstance(rid, str) or not rid or len(rid) > MAX_ID_CHARS:
            raise _Invalid(f"field 'request_id' is required (non-empty string) for {t} events")
    elif rid is not None and not isinstance(rid, str):
        raise _Invalid("field 'request_id' must be a string")
    ctx_in = obj.get("context")
    if ctx_in is not None and not isinstance(ctx_in, dict):
        raise _Invalid("field 'context' must be an object")
    extra = {k: v for k, v in obj.items() if k not in _KNOWN}
    ctx: dict[str, Any] | None = None
    if ctx_in or extra:
        ctx = dict(ctx_in or {})
        ctx.update(extra)
    assert user is not None and item is not None
    return kind, user, item, cat, action, ts, rid, ctx


def decode_batch(records: Sequence[RawRecord]) -> tuple[DecodedBatch, list[DeadLetter]]:
    """Decode and validate a batch. Never raises on bad data: bad records become DeadLetters."""
    kinds: list[int] = []
    users: list[int] = []
    items: list[int] = []
    cats: list[int] = []
    actions: list[int] = []
    tss: list[int] = []
    rids: list[str | None] = []
    raws: list[str] = []
    item_raws: list[str] = []
    cat_raws: list[str] = []
    parts: list[int] = []
    offs: list[int] = []
    ctxs: list[dict[str, Any] | None] = []
    dead: list[DeadLetter] = []
    for rec in records:
        v = rec.value
        try:
            if v is None:
                raise _Invalid("empty message (null value)")
            if len(v) > MAX_EVENT_BYTES:
                raise _Invalid(f"message of {len(v)} bytes exceeds {MAX_EVENT_BYTES}")
            try:
                obj = json.loads(v)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise _Invalid(f"not valid UTF-8 JSON: {str(e)[:80]}") from None
            kind, user, item, cat, action, ts, rid, ctx = _validate(obj)
        except _Invalid as e:
            dead.append(DeadLetter(rec, str(e)))
            continue
        kinds.append(kind)
        users.append(hash_id(user))
        items.append(hash_id(item))
        cats.append(hash_id(cat) if cat is not None else 0)
        actions.append(action)
        tss.append(ts)
        rids.append(rid)
        raws.append(user)
        item_raws.append(item)
        cat_raws.append(cat or "")
        parts.append(rec.partition)
        offs.append(rec.offset)
        ctxs.append(ctx)
    batch = DecodedBatch(
        kind=np.asarray(kinds, dtype=np.uint8),
        user=np.asarray(users, dtype=np.int64),
        item=np.asarray(items, dtype=np.int64),
        category=np.asarray(cats, dtype=np.int64),
        action=np.asarray(actions, dtype=np.uint8),
        ts=np.asarray(tss, dtype=np.int64),
        request_id=rids,
        user_raw=raws,
        item_raw=item_raws,
        cat_raw=cat_raws,
        partition=np.asarray(parts, dtype=np.int32),
        offset=np.asarray(offs, dtype=np.int64),
        context=ctxs,
    )
    return batch, dead


def encode_event(event: dict[str, Any]) -> bytes:
    """Serialise an event dict for the ``events`` topic (compact JSON)."""
    return json.dumps(event, separators=(",", ":")).encode()


def user_key(user_id: str | int) -> bytes:
    """Kafka message key for a user: its id as UTF-8 bytes (partitioning keeps a user on one partition)."""
    return str(user_id).encode()


def iter_json_lines(values: Iterable[bytes]) -> Iterable[dict[str, Any]]:
    for v in values:
        yield json.loads(v)
