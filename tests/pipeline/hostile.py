"""Seeded generator of hostile event records, shared by the decode and worker fuzz tests."""

from __future__ import annotations

import json
import random
from typing import Any

from pipeline.events import MAX_EVENT_BYTES

T0 = 1_767_225_600_000


def good_event(rng: random.Random, user: int | None = None) -> dict[str, Any]:
    kind = rng.choice(["behavior"] * 6 + ["impression", "click"])
    e: dict[str, Any] = {"type": kind, "user_id": user if user is not None else rng.randrange(50),
                         "item_id": rng.choice([rng.randrange(1000), f"it-{rng.randrange(1000)}"]),
                         "ts": T0 + rng.randrange(10**7)}
    if kind == "impression" or rng.random() < 0.7:
        e["category_id"] = rng.randrange(30)
    if kind != "behavior":
        e["request_id"] = f"r{rng.randrange(10**6)}"
    if kind == "behavior" and rng.random() < 0.5:
        e["action"] = rng.choice(["view", "cart", "buy", "weird-action"])
    if rng.random() < 0.05:
        e["context"] = {"page": "home", "{odd}": "[x]"}
    if rng.random() < 0.05:
        e["device"] = "ios"
    return e


def hostile_value(rng: random.Random) -> bytes | None:
    """One malformed or hostile record value (each one must end in the DLQ)."""
    base = good_event(rng)
    raw = json.dumps(base).encode()
    choice = rng.randrange(26)
    if choice == 0:
        return raw[: rng.randrange(1, len(raw) - 1)]  # truncated JSON
    if choice == 1:
        return b'{"type":"behavior","user_id":"' + b"x" * (MAX_EVENT_BYTES + 10) + b'"}'  # huge
    if choice == 2:
        return json.dumps({**base, "user_id": "u" * 300}).encode()  # id too long
    if choice == 3:
        return json.dumps({**base, "user_id": rng.choice([[1], {"a": 1}, True, 1.5, None, ""])}).encode()
    if choice == 4:
        return json.dumps({**base, "ts": rng.choice([-1, 0, 10**17, "soon", 1.5e12 + 0.5, True, None])}).encode()
    if choice == 5:
        return b"\xff\xfe" + raw  # not UTF-8 / a BOM
    if choice == 6:
        return raw.decode().encode("utf-16")  # UTF-16 JSON: not UTF-8
    if choice == 7:
        depth = rng.choice([50, 5000, 40000])
        return b'{"type":"behavior","x":' + b"[" * depth + b"]" * depth + b"}"  # deep nesting
    if choice == 8:
        return None  # tombstone
    if choice == 9:
        return b'{"type":"behavior","user_id":"\\ud800","item_id":1,"ts":%d}' % T0  # lone surrogate
    if choice == 10:
        return b'{"type":"behavior","user_id":1,"item_id":1,"ts":1' + b"0" * 5000 + b"}"  # int digits
    if choice == 11:
        return json.dumps({**base, "type": rng.choice(["teleport", 1, None, ["behavior"]])}).encode()
    if choice == 12:
        return json.dumps([base]).encode()  # not an object
    if choice == 13:
        return b'{"a":[{}'  # opens structure: only "valid" if merged with a neighbour
    if choice == 14:
        return b'{}]}'
    if choice == 15:
        return raw + b"," + raw  # two objects in one record
    if choice == 16:
        return json.dumps({**base, "type": "impression", "request_id": rng.choice([None, "", 5, "r" * 300])}).encode()
    if choice == 17:
        return json.dumps({k: v for k, v in {**base, "type": "impression"}.items() if k != "category_id"}).encode()
    if choice == 18:
        return json.dumps({**base, "context": rng.choice([[1], "ctx", 3])}).encode()
    if choice == 19:
        return json.dumps({**base, "action": rng.choice([None, 5, "a" * 40])}).encode()
    if choice == 20:
        return b"NaN" if rng.random() < 0.5 else json.dumps({**base, "ts": float("nan")}).encode()
    if choice == 21:
        return b""
    if choice == 22:
        return raw + b"\n" + raw  # a newline between two objects
    if choice == 23:
        return json.dumps({**base, "request_id": "\ud800"}).encode()  # escaped lone surrogate
    if choice == 24:
        return json.dumps({**base, "item_id": False}).encode()
    return rng.choice([b"null", b"42", b'"str"', b"{", b"}", b"{}", b"[]", b"\x00" * 10])


def hostile_records(seed: int, n_good: int, n_bad: int, users: int = 20) -> list[tuple[bytes | None, bytes | None, bool]]:
    """(key, value, is_good) in a seeded shuffled order; keys of bad records are random bytes."""
    rng = random.Random(seed)
    out: list[tuple[bytes | None, bytes | None, bool]] = []
    for _ in range(n_good):
        e = good_event(rng, rng.randrange(users))
        out.append((str(e["user_id"]).encode(), json.dumps(e, separators=(",", ":")).encode(), True))
    for _ in range(n_bad):
        key = rng.choice([None, b"\xff\xfe\x00", bytes(rng.randrange(256) for _ in range(8)), b"1"])
        out.append((key, hostile_value(rng), False))
    rng.shuffle(out)
    return out
