import json

import pytest

from pipeline.events import ACTIONS, MAX_EVENT_BYTES, RawRecord, decode_batch, hash_id
from tests.fixtures import event


def rec(value: bytes | None, offset: int = 0) -> RawRecord:
    return RawRecord("events", 0, offset, b"k", value)


def enc(e: dict) -> bytes:
    return json.dumps(e).encode()


def test_hash_id_is_stable_63_bit_and_type_insensitive():
    assert hash_id(42) == hash_id("42")
    assert 0 <= hash_id("user-1") < 2**63
    assert hash_id("a") != hash_id("b")


def test_valid_events_decode_columnar():
    recs = [rec(enc(event())), rec(enc(event("impression", request_id="r1")), 1),
            rec(enc(event("click", request_id="r1", item=10)), 2)]
    b, dead = decode_batch(recs)
    assert not dead
    assert b.kind.tolist() == [0, 1, 2]
    assert b.action.tolist() == [ACTIONS["view"], ACTIONS["view"], ACTIONS["click"]]
    assert b.user.tolist() == [hash_id(1)] * 3
    assert b.offset.tolist() == [0, 1, 2]


def test_unknown_fields_go_to_context():
    b, dead = decode_batch([rec(enc(event(device="ios", context={"page": "home"})))])
    assert not dead and b.context[0] == {"page": "home", "device": "ios"}


@pytest.mark.parametrize("value,reason", [
    (b"\xff\xfe", "not valid UTF-8 JSON"),
    (b"{trunc", "not valid UTF-8 JSON"),
    (b"[1,2]", "must be a JSON object"),
    (None, "empty message"),
    (enc({"type": "behavior", "item_id": 1, "ts": 1_767_225_600_000}), "missing field 'user_id'"),
    (enc(event(user=[1])), "field 'user_id' must be a string or integer"),
    (enc(event(user=True)), "field 'user_id' must be a string or integer"),
    (enc(event(user="")), "field 'user_id' is empty"),
    (enc(event(user="x" * 1000)), "longer than"),
    (enc(event(ts=-5)), "field 'ts' out of range"),
    (enc(event(ts=10**16)), "field 'ts' out of range"),
    (enc(event(ts="now")), "field 'ts' must be an integer"),
    (enc(event(ts=1.5e12 + 0.5)), "field 'ts' must be an integer"),
    (enc(event(kind="teleport")), "field 'type' must be one of"),
    (enc(event(kind="impression")), "field 'request_id' is required"),
    (enc({k: v for k, v in event(kind="impression", request_id="r").items() if k != "category_id"}),
     "missing field 'category_id'"),
    (enc(event(context=[1])), "field 'context' must be an object"),
    (b'{"a":' + b" " * MAX_EVENT_BYTES + b"1}", "exceeds"),
])
def test_bad_records_become_dead_letters_with_reason(value, reason):
    b, dead = decode_batch([rec(value, 7), rec(enc(event()), 8)])
    assert len(b) == 1 and b.offset.tolist() == [8]  # the good one survives
    assert len(dead) == 1 and reason in dead[0].reason
    dl = json.loads(dead[0].to_json())
    assert dl["offset"] == 7 and dl["partition"] == 0 and dl["reason"] == dead[0].reason
    if value is not None:
        assert bytes.fromhex(dl["value_hex"]) == value  # original bytes kept
