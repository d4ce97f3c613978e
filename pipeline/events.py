"""The event contract (DESIGN.md §3): decode, validate, and route bad records to the DLQ.

Events are JSON objects on topic ``events`` keyed by user id. Decoding works on whole batches and
returns columnar arrays for the worker's hot path plus one :class:`DeadLetter` per rejected record;
a bad record never raises out of :func:`decode_batch`.

Ids (user, item, category) are hashed with xxh3_64 of their string form to 63-bit integers, so
``42`` and ``"42"`` are the same id. The hash is stable across processes and machines; models
fold it into sized embedding tables (``models.features``).
"""

from __future__ import annotations

import functools
import json
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Annotated, Any, Literal, NamedTuple

import numpy as np
import xxhash

__all__ = [
    "ACTIONS",
    "EVENT_TYPES",
    "MAX_EVENT_BYTES",
    "DeadLetter",
    "DecodedBatch",
    "RawRecord",
    "RecordBatch",
    "decode_batch",
    "encode_event",
    "hash_id",
    "id_str",
    "raw_record_from_tuple",
]

#: Behavior kinds, as stored (uint8). 0 is reserved for padding in model inputs.
ACTIONS: dict[str, int] = {"view": 1, "click": 2, "cart": 3, "fav": 4, "buy": 5, "other": 6}
#: Event types, as decoded.
EVENT_TYPES: dict[str, int] = {"behavior": 0, "impression": 1, "click": 2}
BEHAVIOR, IMPRESSION, CLICK = 0, 1, 2

#: Larger messages are rejected: a behavior event is ~150 bytes; 64 KiB leaves room for context
#: maps while keeping one hostile record from bloating a batch.
MAX_EVENT_BYTES = 64 * 1024
#: Action names longer than this are rejected (an unknown name of at most this length is "other").
MAX_ACTION_CHARS = 32
#: Ids longer than this are rejected (they are hashed anyway; a 1 MB "id" is an attack or a bug).
MAX_ID_CHARS = 256
#: Event time must fall in [2000-01-01, 2100-01-01) in ms: catches seconds-vs-ms mix-ups and garbage.
MIN_TS_MS = 946_684_800_000
MAX_TS_MS = 4_102_444_800_000

try:  # optional accelerator of the batch parse (see _loads_flat_batch); json alone gives the same result
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the environment
    _orjson = None  # type: ignore[assignment]
try:  # optional: decodes AND validates the common event shape in C (see _typed_batch); same results
    import msgspec as _msgspec
except ImportError:  # pragma: no cover - depends on the environment
    _msgspec = None  # type: ignore[assignment]
try:  # optional: the C fast path of the typed decode (pipeline/_fastdecode.c, built by the install)
    from pipeline import _fastdecode
except ImportError:  # pragma: no cover - no C compiler where it was installed
    _fastdecode = None  # type: ignore[assignment]
_DIGITS_TO_0 = bytes.maketrans(b"123456789", b"000000000")  # then a run of 19 digits is a substring search
_DIGITS_19 = b"0" * 19

_KNOWN = frozenset({"type", "user_id", "item_id", "category_id", "action", "ts", "request_id", "context"})
_MASK63 = (1 << 63) - 1
_ABSENT = object()


def hash_id(value: str | int) -> int:
    """Stable 63-bit id of a user, item or category (xxh3_64 of its string form)."""
    return xxhash.xxh3_64_intdigest(str(value).encode()) & _MASK63


class RawRecord(NamedTuple):
    """One record as consumed: where it came from and its bytes (a tuple: cheap on the hot path)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class RecordBatch:
    """One poll batch of one topic, as columns: what the adapters hand the worker.

    The consumer adapters fill it with a few C-level maps over the client's messages, with no Python
    object per record; keys are fetched only when asked for (dead letters carry them).
    :meth:`from_records` and :meth:`records` convert from and to :class:`RawRecord` lists.
    """

    __slots__ = ("topic", "partition", "offset", "value", "_key")

    def __init__(self, topic: str, partition: np.ndarray, offset: np.ndarray, value: list[bytes | None],
                 key: list[bytes | None] | Callable[[], list[bytes | None]]) -> None:
        self.topic = topic
        self.partition = partition  # (n,) int64
        self.offset = offset  # (n,) int64
        self.value = value  # (n,)
        self._key = key  # (n,), or a function that returns them

    def __len__(self) -> int:
        return len(self.value)

    @property
    def key(self) -> list[bytes | None]:
        if callable(self._key):
            self._key = self._key()
        return self._key

    @staticmethod
    def only_topic(topics: set[str]) -> str:
        """The one topic of a batch ("" for an empty one); ValueError when there are several."""
        if len(topics) > 1:
            raise ValueError(f"a record batch must come from one topic, got {sorted(topics)}")
        return topics.pop() if topics else ""

    @classmethod
    def from_records(cls, records: Sequence[RawRecord]) -> RecordBatch:
        """Columns of ``records``, which must all come from one topic (ValueError otherwise)."""
        n = len(records)
        return cls(cls.only_topic({r.topic for r in records}), np.fromiter(map(_R_PARTITION, records), np.int64, n),
                   np.fromiter(map(_R_OFFSET, records), np.int64, n), list(map(_R_VALUE, records)),
                   list(map(_R_KEY, records)))

    def take(self, rows: np.ndarray) -> RecordBatch:
        """The records at ``rows`` (int indices, in order)."""
        idx = rows.tolist()
        key = self._key
        return RecordBatch(self.topic, self.partition[rows], self.offset[rows], list(map(self.value.__getitem__, idx)),
                           lambda: list(map((key() if callable(key) else key).__getitem__, idx)))

    def record(self, i: int) -> RawRecord:
        return RawRecord(self.topic, int(self.partition[i]), int(self.offset[i]), self.key[i], self.value[i])

    def records(self) -> list[RawRecord]:
        return list(map(RawRecord, repeat(self.topic), self.partition.tolist(), self.offset.tolist(), self.key,
                        self.value))


_R_PARTITION, _R_OFFSET, _R_KEY, _R_VALUE = (operator.itemgetter(i) for i in range(1, 5))  # RawRecord fields
#: Builds a RawRecord from a 5-tuple in C (what ``RawRecord._make`` does, minus its Python frame):
#: the consumer adapters map it over their clients' messages.
raw_record_from_tuple = functools.partial(tuple.__new__, RawRecord)


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
    request_id: Sequence[str | None]  # (n,)
    user_id: Sequence[str | int]  # (n,) original user id as decoded (its string form: id_str)
    item_id: Sequence[str | int]  # (n,) original item id
    category_id: Sequence[str | int | None]  # (n,) original category id, None or "" when absent
    partition: np.ndarray  # (n,) int64 source partition
    offset: np.ndarray  # (n,) int64 source offset
    context: list[dict[str, Any] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    # The string forms (what samples carry), for the whole batch; the worker takes them per row
    # with id_str, only for the rows that need them (impressions).
    @property
    def user_raw(self) -> list[str]:
        return list(map(id_str, self.user_id))

    @property
    def item_raw(self) -> list[str]:
        return list(map(id_str, self.item_id))

    @property
    def cat_raw(self) -> list[str]:
        return list(map(id_str, self.category_id))


def id_str(v: str | int | None) -> str:
    """The string form of a decoded id (what it is hashed from); "" for an absent one."""
    return v if v.__class__ is str else "" if v is None else str(v)


class _Invalid(ValueError):
    pass


class _Bad:
    """A record that failed before validation (bytes, size, JSON); carries the DLQ reason."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


#: Id -> (string form, hash) for ids seen recently. Users and items repeat heavily in a stream (a
#: batch of 5,000 events touches a few hundred users), so most lookups hit and skip str(), the
#: checks and xxh3. 2^18 entries is ~40 MB at worst (long string ids) and ~25 MB for integer ids;
#: the cache is simply cleared when full (no LRU bookkeeping on the hot path). Only ids that passed
#: validation are cached, and validity does not depend on the field, so a hit is a valid id.
ID_CACHE_MAX = 1 << 18
_ID_CACHE: dict[str | int, tuple[str, int, type]] = {}

#: Records a flat-batch parse groups at once when a batch needs the careful path (some record is
#: not flat, or one flat record is bad JSON): small enough that a bad record costs a re-parse of
#: at most this many neighbours one by one, large enough to keep the one-call speed-up.
FLAT_GROUP = 256


def _id(v: Any, name: str, required: bool) -> tuple[str, int, type] | None:
    """Validate an id field and return (string form, 63-bit hash, type), or None when absent."""
    cls = v.__class__
    if cls is str or cls is int:  # not bool: True == 1 must not hit the cache entry of 1
        hit = _ID_CACHE.get(v)
        if hit is not None and hit[2] is cls:
            return hit
        s = v if cls is str else str(v)
        if not s:
            raise _Invalid(f"field '{name}' is empty")
        if len(s) > MAX_ID_CHARS:
            raise _Invalid(f"field '{name}' is longer than {MAX_ID_CHARS} characters")
        try:
            b = s.encode()
        except UnicodeEncodeError:
            raise _Invalid(f"field '{name}' is not valid Unicode (lone surrogate)") from None
        out = (s, xxhash.xxh3_64_intdigest(b) & _MASK63, cls)
        if len(_ID_CACHE) >= ID_CACHE_MAX:
            _ID_CACHE.clear()
        _ID_CACHE[v] = out
        return out
    if v is None:
        if required:
            raise _Invalid(f"missing field '{name}'")
        return None
    raise _Invalid(f"field '{name}' must be a string or integer, got {type(v).__name__}")


_Id = tuple[str, int, type]
_Validated = tuple[int, _Id, _Id, "_Id | None", int, int, "str | None", "dict[str, Any] | None"]


def _validate(obj: Any) -> _Validated:
    if obj.__class__ is not dict:
        raise _Invalid(f"event must be a JSON object, got {type(obj).__name__}")
    get = obj.get
    t = get("type")
    kind = EVENT_TYPES.get(t) if t.__class__ is str else None
    if kind is None:
        raise _Invalid(f"field 'type' must be one of {sorted(EVENT_TYPES)}, got {t!r:.40}")
    user = _id(get("user_id"), "user_id", True)
    item = _id(get("item_id"), "item_id", True)
    cat = _id(get("category_id"), "category_id", kind == IMPRESSION)
    action_name = get("action", _ABSENT)
    if action_name is _ABSENT:
        action = ACTIONS["click"] if kind == CLICK else ACTIONS["view"]
    elif action_name.__class__ is not str or len(action_name) > 32:
        raise _Invalid("field 'action' must be a short string")
    else:
        action = ACTIONS.get(action_name, ACTIONS["other"])
    ts = get("ts")
    if ts.__class__ is not int:
        if ts.__class__ is not float:
            raise _Invalid(f"field 'ts' must be an integer (ms since epoch), got {type(ts).__name__}")
        if not math.isfinite(ts) or ts != int(ts):
            raise _Invalid("field 'ts' must be an integer (ms since epoch)")
        ts = int(ts)
    if not MIN_TS_MS <= ts < MAX_TS_MS:
        raise _Invalid(f"field 'ts' out of range [2000-01-01, 2100-01-01) in ms: {ts}")
    rid = get("request_id")
    if kind != BEHAVIOR:
        if rid.__class__ is not str or not rid or len(rid) > MAX_ID_CHARS:
            raise _Invalid(f"field 'request_id' is required (non-empty string) for {t} events")
    elif rid is not None and rid.__class__ is not str:
        raise _Invalid("field 'request_id' must be a string")
    if rid is not None:
        try:
            rid.encode()
        except UnicodeEncodeError:
            raise _Invalid("field 'request_id' is not valid Unicode (lone surrogate)") from None
    ctx: dict[str, Any] | None = None
    if "context" in obj or not obj.keys() <= _KNOWN:
        ctx_in = get("context")
        if ctx_in is not None and ctx_in.__class__ is not dict:
            raise _Invalid("field 'context' must be an object")
        extra = {k: v for k, v in obj.items() if k not in _KNOWN}
        if ctx_in or extra:
            ctx = dict(ctx_in or {})
            ctx.update(extra)
    assert user is not None and item is not None
    return kind, user, item, cat, action, ts, rid, ctx


def _parse_one(v: bytes | None) -> Any:
    """Parse one record by itself (the reference semantics; the batch paths must agree with it)."""
    if v is None:
        return _Bad("empty message (null value)")
    if len(v) > MAX_EVENT_BYTES:
        return _Bad(f"message of {len(v)} bytes exceeds {MAX_EVENT_BYTES}")
    try:
        return json.loads(v.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSON, UTF-8, and int-digit-limit errors are ValueErrors
        return _Bad(f"not valid UTF-8 JSON: {str(e)[:80]}")


def _flat(v: bytes | None) -> bool:
    """A record whose only braces are its first and last byte, with no brackets and no newline."""
    return (v is not None and len(v) <= MAX_EVENT_BYTES and v[:1] == b"{" and v[-1:] == b"}"
            and v.count(b"{") == 1 and v.count(b"}") == 1 and b"[" not in v and b"]" not in v
            and b"\n" not in v)


def _parse_flat_group(values: list[bytes]) -> list[Any] | None:
    """Parse flat records with ONE json.loads over ``[v0,\\nv1,\\n...\\n]``; None when that fails.

    Why grouping cannot change what a record means: strict JSON forbids a raw newline inside a
    string, so no string spans the ``,\\n`` separator; a flat record's only brace bytes are its
    first byte (``{``, structural since no string is open there) and its last byte (``}``,
    structural, else the string it closes would run into the newline); with no other brace or
    bracket byte anywhere in it, the record is exactly one array element. So the parse succeeds
    iff every record parses alone, and element i equals ``json.loads(values[i])``.
    """
    try:
        parsed = json.loads(b"".join((b"[", b",\n".join(values), b"\n]")).decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return parsed if len(parsed) == len(values) else None


def _loads_flat_batch(text: bytes) -> Any:
    """``json.loads(text.decode("utf-8"))``, through orjson when it is installed and gives the same.

    orjson (optional: ``pip install orjson``) parses this batch text about twice as fast. Where both
    parse, they agree (strict UTF-8, last duplicate key wins in the first key's place, correctly
    rounded floats), except that orjson turns an integer outside [-2^63, 2^64) into a float: so a
    text holding any run of 19 digits (every such integer has one) goes to json. Whatever orjson
    rejects (NaN/Infinity, lone surrogate escapes, 1e400, which json accepts) goes to json too,
    so the result, or the error, is json's. The decode tests compare this path with the
    one-record json reference over hostile and arbitrary records.
    """
    if _orjson is not None and _DIGITS_19 not in text.translate(_DIGITS_TO_0):
        try:
            return _orjson.loads(text)
        except _orjson.JSONDecodeError:
            pass
    return json.loads(text.decode("utf-8"))


def _parse_all(values: list[bytes | None]) -> list[Any]:
    n = len(values)
    # Fast path: every record flat. Checked on the joined text with a handful of C-speed counts:
    # n "{" and n "}" in all, the only brackets are the outer pair, the only newlines are the n
    # separators, and every separator sits between a "}" and a "{". Together: each record starts
    # with "{", ends with "}", and holds no other brace, bracket or newline (see _parse_flat_group).
    try:
        text = b"".join((b"[", b",\n".join(values), b"\n]"))  # type: ignore[arg-type]
        longest = max(map(len, values))  # type: ignore[arg-type]
    except TypeError:  # a null value
        text, longest = b"", MAX_EVENT_BYTES + 1
    if (longest <= MAX_EVENT_BYTES and text.count(b"{") == n and text.count(b"}") == n
            and text.count(b"[") == 1 and text.count(b"]") == 1 and text.count(b"\n") == n
            and text.count(b"},\n{") == n - 1 and text[1:2] == b"{" and text[-3:-2] == b"}"):
        try:
            parsed = _loads_flat_batch(text)
            if len(parsed) == n:
                return parsed  # type: ignore[no-any-return]
        except (ValueError, RecursionError):
            pass
    # Careful path: flat records in groups (a failed group is re-parsed one by one), others alone.
    out: list[Any] = [None] * n
    group: list[int] = []

    def flush() -> None:
        got = _parse_flat_group([values[j] for j in group])  # type: ignore[misc]
        if got is None:
            for j in group:
                out[j] = _parse_one(values[j])
        else:
            for j, o in zip(group, got, strict=True):
                out[j] = o
        group.clear()

    for i, v in enumerate(values):
        if _flat(v):
            group.append(i)
            if len(group) >= FLAT_GROUP:
                flush()
        else:
            out[i] = _parse_one(v)
    if group:
        flush()
    return out


_ACTION_OF: dict[Any, int] = dict(ACTIONS)
_DEFAULT_ACTION = (ACTIONS["view"], ACTIONS["view"], ACTIONS["click"])  # by kind
_EMPTY_CAT: tuple[str, int, type] = ("", 0, str)


class _Slow(Exception):
    pass


def _fast(obj: Any) -> tuple[Any, ...]:
    """The common case in few operations; raises (KeyError, TypeError, _Slow) on anything else.

    Accepts a subset of what :func:`_validate` accepts and returns the same values for it: a flat
    event with known fields only, cached (already validated) ids of the right type, an integer
    in-range ts, a known action name, an ASCII request id. Everything else takes ``_validate``.
    """
    if obj.__class__ is not dict:
        raise _Slow
    kind = EVENT_TYPES[obj["type"]]
    v = obj["user_id"]
    u = _ID_CACHE[v]
    if v.__class__ is not u[2]:  # True/1.0 hash like 1: type must match the cached entry's
        raise _Slow
    v = obj["item_id"]
    it = _ID_CACHE[v]
    if v.__class__ is not it[2]:
        raise _Slow
    ts = obj["ts"]
    if ts.__class__ is not int or not MIN_TS_MS <= ts < MAX_TS_MS:
        raise _Slow
    n = 4
    v = obj.get("category_id")
    if v is None:
        if kind == IMPRESSION:
            raise _Slow
        c = _EMPTY_CAT
    else:
        c = _ID_CACHE[v]
        if v.__class__ is not c[2]:
            raise _Slow
        n += 1
    a = obj.get("action")
    if a is None:
        action = _DEFAULT_ACTION[kind]
    else:
        action = _ACTION_OF[a] if a.__class__ is str else -1
        if action < 0:
            raise _Slow
        n += 1
    rid = obj.get("request_id")
    if rid is not None:
        if rid.__class__ is not str or not rid or len(rid) > MAX_ID_CHARS or not rid.isascii():
            raise _Slow
        n += 1
    elif kind != BEHAVIOR:
        raise _Slow
    if len(obj) != n:  # context or unknown fields
        raise _Slow
    return kind, u, it, c, action, ts, rid, None


_REQUIRED = tuple(map(operator.itemgetter, ("type", "user_id", "item_id", "ts")))
_RAW, _HASH = operator.itemgetter(0), operator.itemgetter(1)
_ACTION_OR_NONE: dict[Any, int] = {**ACTIONS, None: 0}
_DICT = {dict}
_ID_TYPES = frozenset({int, str})
_OPT_ID_TYPES = frozenset({int, str, type(None)})
_OPT_STR = frozenset({str, type(None)})


def _cached_ids(vals: Sequence[Any], name: str, required: bool) -> list[Any] | None:
    """Id entries (string, hash, type) of ``vals`` (ints and strings only), None when one is invalid."""
    got = list(map(_ID_CACHE.get, vals))
    if None in got:
        try:
            for i in [i for i, g in enumerate(got) if g is None]:
                got[i] = _id(vals[i], name, required) or _EMPTY_CAT
        except _Invalid:
            return None
    return got


def _columnar(records: Sequence[RawRecord], objs: list[Any]) -> DecodedBatch | None:
    """Validate a whole batch of parsed objects column by column, with C-level maps; None (use the
    row path) unless every record is a plain event with known fields only and valid values.

    It accepts exactly what :func:`_fast` accepts (known action names, ASCII request ids, integer
    ts, int/str ids that :func:`_id` accepts, no context, no null fields) and returns the same
    values: the decode tests compare every path with the one-record reference.
    """
    n = len(objs)
    try:
        if set(map(type, objs)) != _DICT:
            return None
        types, users, items, tss = (list(map(g, objs)) for g in _REQUIRED)
        kinds = list(map(EVENT_TYPES.get, types))
        # dict.get over repeat(key): the same as methodcaller("get", key), a third of the cost
        cats = list(map(dict.get, objs, repeat("category_id")))
        actions = list(map(_ACTION_OR_NONE.get, map(dict.get, objs, repeat("action"))))
    except (KeyError, TypeError):  # a missing field, or an unhashable value where a name belongs
        return None
    rids = list(map(dict.get, objs, repeat("request_id")))
    if (None in kinds or None in actions or set(map(type, tss)) != {int}
            or not set(map(type, users)) <= _ID_TYPES or not set(map(type, items)) <= _ID_TYPES
            or not set(map(type, cats)) <= _OPT_ID_TYPES or not set(map(type, rids)) <= _OPT_STR):
        return None
    try:
        ts = np.fromiter(tss, np.int64, n)
    except OverflowError:
        return None
    if ts.min() < MIN_TS_MS or ts.max() >= MAX_TS_MS:
        return None
    kind = np.fromiter(kinds, np.uint8, n)
    has_cat = np.fromiter(map(operator.is_not, cats, repeat(None)), bool, n)
    has_rid = np.fromiter(map(operator.is_not, rids, repeat(None)), bool, n)
    action = np.fromiter(actions, np.uint8, n)
    has_action = action != 0
    # known fields only: the dict holds exactly the 4 required plus the optional ones present
    expect = 4 + has_cat.astype(np.int64) + has_action + has_rid
    if not np.array_equal(np.fromiter(map(len, objs), np.int64, n), expect):
        return None
    if not has_cat[kind == IMPRESSION].all() or not has_rid[kind != BEHAVIOR].all():
        return None
    if not all(map(str.isascii, filter(None, rids))):  # every request id present is ASCII ("" is)
        return None
    joined: list[str] = list(map(rids.__getitem__, np.flatnonzero(kind != BEHAVIOR).tolist()))  # type: ignore[arg-type]  # all str: has_rid checked above
    if "" in joined or max(map(len, joined), default=0) > MAX_ID_CHARS:
        return None
    ue = _cached_ids(users, "user_id", True)
    ie = _cached_ids(items, "item_id", True)
    ce = _cached_ids(cats, "category_id", False)
    if ue is None or ie is None or ce is None:
        return None
    action[~has_action] = np.where(kind[~has_action] == CLICK, ACTIONS["click"], ACTIONS["view"])
    return DecodedBatch(
        kind=kind,
        user=np.fromiter(map(_HASH, ue), np.int64, n),
        item=np.fromiter(map(_HASH, ie), np.int64, n),
        category=np.fromiter(map(_HASH, ce), np.int64, n),
        action=action,
        ts=ts,
        request_id=rids,
        user_id=list(map(_RAW, ue)),
        item_id=list(map(_RAW, ie)),
        category_id=list(map(_RAW, ce)),
        partition=np.fromiter(map(_R_PARTITION, records), np.int64, n),
        offset=np.fromiter(map(_R_OFFSET, records), np.int64, n),
        context=[None] * n,
    )


# ---- the typed path: msgspec parses and validates the plain event shape in C ----------------------

if _msgspec is not None:
    _Int64 = Annotated[int, _msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
    _IdStr = Annotated[str, _msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]

    class _PlainEvent(_msgspec.Struct, forbid_unknown_fields=True, gc=False):
        """The plain event shape (DESIGN.md §3 without ``context`` or unknown fields), as a type.

        Every constraint here is one :func:`_validate` also enforces, or stricter (an integer id
        within int64, a non-empty request id of at most ``MAX_ID_CHARS``, no float ``ts``, no null
        ``action``), so what decodes is valid and means the same; the rest takes the other paths.
        ``null`` for ``category_id``/``request_id`` means absent, as in :func:`_validate`.
        """

        type: Literal["behavior", "impression", "click"]
        user_id: _IdStr | _Int64
        item_id: _IdStr | _Int64
        ts: Annotated[int, _msgspec.Meta(ge=MIN_TS_MS, lt=MAX_TS_MS)]
        category_id: _IdStr | _Int64 | None = None
        action: Annotated[str, _msgspec.Meta(max_length=MAX_ACTION_CHARS)] | _msgspec.UnsetType = _msgspec.UNSET
        request_id: _IdStr | None = None

    _decode_plain = _msgspec.json.Decoder(_PlainEvent).decode
    _TYPED_ERRORS: tuple[type[BaseException], ...] = (_msgspec.DecodeError, TypeError)
    _ACTION_CODE: dict[Any, int] = {**ACTIONS, _msgspec.UNSET: 0}  # 0: absent (the default by kind)
    _astuple = _msgspec.structs.astuple


#: Id -> 63-bit hash, for the typed path, whose ids are exactly str or int (no bool or float that
#: would alias an int key), so a hit needs no type check; None (an absent category) hashes to 0.
#: Cleared when full, like _ID_CACHE.
_HASH_CACHE: dict[str | int | None, int] = {None: 0}

#: Integer ids get a direct-mapped table in numpy instead (slot = Fibonacci hash of the id): one
#: vectorised gather per column where the dict costs a dependent chain of cache misses per id
#: (~25 ns/id against ~80 ns measured on this box, more under load). 2^18 slots (4 MiB) keep
#: collisions rare for a few tens of thousands of hot ids (a colliding id is re-hashed, ~0.5 us);
#: every slot always holds a valid (id, hash) pair: it starts as id 0 with its true hash.
INT_ID_SLOTS_LOG2 = 18
_INT_IDS = np.zeros(1 << INT_ID_SLOTS_LOG2, np.int64)
_INT_HASHES = np.full(1 << INT_ID_SLOTS_LOG2, xxhash.xxh3_64_intdigest(b"0") & _MASK63, np.int64)
_FIB = np.uint64(0x9E3779B97F4A7C15)
_SLOT_SHIFT = np.uint64(64 - INT_ID_SLOTS_LOG2)
_INT_ONLY = {int}


def _int_id_hashes(ids: np.ndarray) -> np.ndarray:
    """(n,) hashes of (n,) int64 ids: ``hash_id`` of each, through the direct-mapped table."""
    slot = (ids.view(np.uint64) * _FIB) >> _SLOT_SHIFT
    hit = _INT_IDS[slot] == ids
    out: np.ndarray = _INT_HASHES[slot]  # read before the misses are filled in: one may take a hit's slot
    if hit.all():
        return out
    miss = np.unique(ids[~hit])
    hashes = np.fromiter((xxhash.xxh3_64_intdigest(str(v).encode()) & _MASK63 for v in miss.tolist()),
                         np.int64, len(miss))
    out[~hit] = hashes[np.searchsorted(miss, ids[~hit])]
    # one write per slot (numpy leaves the winner of repeated indices unspecified, and the id and
    # its hash must come from the same element)
    miss_slot, one = np.unique((miss.view(np.uint64) * _FIB) >> _SLOT_SHIFT, return_index=True)
    _INT_IDS[miss_slot] = miss[one]
    _INT_HASHES[miss_slot] = hashes[one]
    return out


def _typed_hashes(vals: Sequence[Any]) -> np.ndarray:
    """(n,) int64 hashes of ids that ``_PlainEvent`` admitted: a vectorised table when all are
    integers (int64, by the type), else one C-level dict map when all are cached."""
    n = len(vals)
    if set(map(type, vals)) == _INT_ONLY:  # (np.fromiter alone would also parse "01" as 1)
        return _int_id_hashes(np.fromiter(vals, np.int64, n))
    try:
        return np.fromiter(map(_HASH_CACHE.__getitem__, vals), np.int64, n)
    except KeyError:
        pass
    if len(_HASH_CACHE) + n > ID_CACHE_MAX:
        _HASH_CACHE.clear()
        _HASH_CACHE[None] = 0
    for v in set(vals).difference(_HASH_CACHE):
        _HASH_CACHE[v] = xxhash.xxh3_64_intdigest(id_str(v).encode()) & _MASK63
    return np.fromiter(map(_HASH_CACHE.__getitem__, vals), np.int64, n)


def _typed_batch(values: list[bytes | None], partition: np.ndarray, offset: np.ndarray) -> DecodedBatch | None:
    """Decode and validate a whole batch of plain events; None (use the other paths) when any
    record is anything else.

    Two decoders, the same result: the C fast path (:mod:`pipeline._fastdecode`, when built) takes
    the common shape (ASCII strings without escapes, integers of at most 18 digits) straight to
    columns; when it declines a batch, msgspec decodes it, one C call per record and one C-level
    transposition into columns. Per record, so no batch-level framing argument is needed (contrast
    :func:`_parse_flat_group`). The decode tests compare both with the one-record json reference
    over hostile and arbitrary records, and assert the C path is taken for the benchmark stream.
    """
    n = len(values)
    if not n:
        return None
    if _fastdecode is not None and values.__class__ is list:
        cols = _fastdecode.decode_plain(values, MAX_EVENT_BYTES, MAX_ID_CHARS, MAX_ACTION_CHARS, MIN_TS_MS,
                                        MAX_TS_MS)
        if cols is not None:
            return _c_typed_batch(cols, partition, offset)
    if _msgspec is None:
        return None
    try:
        if max(map(len, values)) > MAX_EVENT_BYTES:  # type: ignore[arg-type]  # also TypeError on a null value
            return None
        objs = list(map(_decode_plain, values))  # type: ignore[arg-type]  # no null value here
    except _TYPED_ERRORS:
        return None
    # the columns, transposed in C (one tuple per field, in _PlainEvent's order): about a third of
    # the cost of one attribute map per field
    types, users, items, ts, cats, actions, rids = zip(*map(_astuple, objs))
    return _typed_columns(
        np.fromiter(map(EVENT_TYPES.__getitem__, types), np.uint8, n), users, _typed_hashes(users), items,
        _typed_hashes(items), np.fromiter(ts, np.int64, n), cats, _typed_hashes(cats),
        np.fromiter(map(_ACTION_CODE.get, actions, repeat(ACTIONS["other"])), np.uint8, n), rids, partition, offset)


def _c_typed_batch(cols: tuple[Any, ...], partition: np.ndarray, offset: np.ndarray) -> DecodedBatch | None:
    kind_b, users, users_h, items, items_h, ts_b, cats, cats_h, action_b, rids = cols
    return _typed_columns(
        np.frombuffer(kind_b, np.uint8), users, _c_hashes(users, users_h), items, _c_hashes(items, items_h),
        np.frombuffer(ts_b, np.int64), cats, _c_hashes(cats, cats_h), np.frombuffer(action_b, np.uint8), rids,
        partition, offset)


def _c_hashes(vals: Sequence[Any], hashes: bytes | None) -> np.ndarray:
    """A C-decoded id column's hashes: hashed in the decode loop (xxh3 in C), or here when the column
    holds an id too long for that (over 240 bytes)."""
    return _typed_hashes(vals) if hashes is None else np.frombuffer(hashes, np.int64)


def _typed_columns(kind: np.ndarray, users: Sequence[Any], user: np.ndarray, items: Sequence[Any], item: np.ndarray,
                   ts: np.ndarray, cats: Sequence[Any], cat: np.ndarray, action: np.ndarray, rids: Sequence[Any],
                   partition: np.ndarray, offset: np.ndarray) -> DecodedBatch | None:
    """The checks that span fields, and the batch; ``action`` 0 is absent (the default by kind),
    and is filled in place."""
    n = len(kind)
    if kind.any():  # impressions need a category; impressions and clicks a request id
        if None in cats and None in [cats[i] for i in np.flatnonzero(kind == IMPRESSION).tolist()]:
            return None
        if None in rids and None in [rids[i] for i in np.flatnonzero(kind).tolist()]:
            return None
    absent = action == 0
    if absent.any():
        action[absent] = np.where(kind[absent] == CLICK, ACTIONS["click"], ACTIONS["view"])
    return DecodedBatch(
        kind=kind,
        user=user,
        item=item,
        category=cat,
        action=action,
        ts=ts,
        request_id=rids,
        user_id=users,
        item_id=items,
        category_id=cats,
        partition=partition,
        offset=offset,
        context=[None] * n,
    )


def decode_batch(records: Sequence[RawRecord] | RecordBatch) -> tuple[DecodedBatch, list[DeadLetter]]:
    """Decode and validate a batch. Never raises on bad data: bad records become DeadLetters.

    When every record is a plain valid event, C code parses and validates them
    (:func:`_typed_batch`: the fast path of :mod:`pipeline._fastdecode`, else msgspec). Otherwise
    the JSON of a whole batch is parsed by one ``json.loads`` when every record is a flat object
    (see :func:`_parse_flat_group` for why that is exactly the per-record result), else in groups
    and one by one. Validation then runs column-wise over the
    whole batch when every record is a plain valid event (:func:`_columnar`), else row by row: a
    short path for the common shape (:func:`_fast`) and the full one, which words the DLQ reason,
    for the rest.
    """
    if len(records) and (_msgspec is not None or _fastdecode is not None):
        if isinstance(records, RecordBatch):
            values, parts, offs = records.value, records.partition, records.offset
        else:
            n = len(records)
            values = list(map(_R_VALUE, records))
            parts = np.fromiter(map(_R_PARTITION, records), np.int64, n)
            offs = np.fromiter(map(_R_OFFSET, records), np.int64, n)
        typed = _typed_batch(values, parts, offs)
        if typed is not None:
            return typed, []
    if isinstance(records, RecordBatch):
        records = records.records()
    objs = _parse_all([r.value for r in records]) if records else []
    if objs:
        fast = _columnar(records, objs)
        if fast is not None:
            return fast, []
    rows: list[tuple[Any, ...]] = []
    meta: list[tuple[int, int, dict[str, Any] | None]] = []
    dead: list[DeadLetter] = []
    for rec, obj in zip(records, objs, strict=True):
        try:
            row = _fast(obj)
        except (KeyError, TypeError, _Slow):
            if obj.__class__ is _Bad:
                dead.append(DeadLetter(rec, obj.reason))
                continue
            try:
                kind, user, item, cat, action, ts, rid, ctx = _validate(obj)
            except _Invalid as e:
                dead.append(DeadLetter(rec, str(e)))
                continue
            row = (kind, user, item, cat or _EMPTY_CAT, action, ts, rid, ctx)
        rows.append(row)
        meta.append((rec.partition, rec.offset, row[7]))
    if rows:
        kinds, users, items, cats, actions, tss, rids, _ = zip(*rows, strict=True)
        row_parts, row_offs, ctxs = zip(*meta, strict=True)
    else:
        kinds = users = items = cats = actions = tss = rids = row_parts = row_offs = ctxs = ()
    batch = DecodedBatch(
        kind=np.fromiter(kinds, np.uint8, len(kinds)),
        user=np.fromiter([u[1] for u in users], np.int64, len(users)),
        item=np.fromiter([i[1] for i in items], np.int64, len(items)),
        category=np.fromiter([c[1] for c in cats], np.int64, len(cats)),
        action=np.fromiter(actions, np.uint8, len(actions)),
        ts=np.fromiter(tss, np.int64, len(tss)),
        request_id=list(rids),
        user_id=[u[0] for u in users],
        item_id=[i[0] for i in items],
        category_id=[c[0] for c in cats],
        partition=np.fromiter(row_parts, np.int64, len(row_parts)),
        offset=np.fromiter(row_offs, np.int64, len(row_offs)),
        context=list(ctxs),
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
