import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ---- the batch decoder agrees with the one-record-at-a-time reference ----------------------------

def reference_decode(records):
    """The contract, record by record: parse alone, validate alone (no batch path, no fast path)."""
    from pipeline import events as ev

    good, dead = [], []
    for r in records:
        obj = ev._parse_one(r.value)
        if isinstance(obj, ev._Bad):
            dead.append((r.offset, obj.reason))
            continue
        try:
            kind, user, item, cat, action, ts, rid, ctx = ev._validate(obj)
        except ev._Invalid as e:
            dead.append((r.offset, str(e)))
            continue
        good.append((r.offset, kind, user[:2], item[:2], cat[:2] if cat else ("", 0), action, ts, rid, ctx))
    return good, dead


def batch_decode(records):
    b, dead = decode_batch(records)
    good = [(o, k, (ur, u), (ir, i), (cr, c), a, t, rid, ctx) for o, k, ur, u, ir, i, cr, c, a, t, rid, ctx in zip(
        b.offset.tolist(), b.kind.tolist(), b.user_raw, b.user.tolist(), b.item_raw, b.item.tolist(), b.cat_raw,
        b.category.tolist(), b.action.tolist(), b.ts.tolist(), b.request_id, b.context, strict=True)]
    return good, [(d.record.offset, d.reason) for d in dead]


@pytest.mark.parametrize("value,reason", [
    (b'{"type":"behavior","user_id":"\\ud800","item_id":1,"ts":1767225600000}', "lone surrogate"),
    (b'{"type":"click","user_id":1,"item_id":1,"ts":1767225600000,"request_id":"\\udfff"}', "lone surrogate"),
    (b'{"type":"behavior","user_id":1,"item_id":1,"ts":1' + b"0" * 5000 + b"}", "not valid UTF-8 JSON"),
    (b'{"x":' + b"[" * 5000 + b"]" * 5000 + b"}", "not valid UTF-8 JSON"),
    (enc(event()).decode().encode("utf-16"), "not valid UTF-8 JSON"),
    (b'{"a":[{}', "not valid UTF-8 JSON"),
    (enc(event()) + b"," + enc(event()), "not valid UTF-8 JSON"),
    (enc(event()) + b"\n" + enc(event()), "not valid UTF-8 JSON"),
    (enc(event(action=None)), "field 'action' must be a short string"),
    (enc(event(user=1.0)), "must be a string or integer"),
    (enc(event(item=False)), "must be a string or integer"),
])
def test_hostile_records_are_dead_letters(value, reason):
    hash_id(1)  # 1 is in the id cache: 1.0 and False must not hit its entry
    b, dead = decode_batch([rec(enc(event()), 6), rec(value, 7), rec(enc(event()), 8)])
    assert b.offset.tolist() == [6, 8] and len(dead) == 1 and reason in dead[0].reason, dead[0].reason


def test_structure_cannot_leak_between_records_of_a_batch():
    """Records that are only valid JSON when joined with their neighbours stay dead letters, and the
    neighbours keep their own content (the one-parse fast path must not regroup records)."""
    split = b'{"type":"behavior","user_id":7,"item_id":1,"ts":1767225600000},{"type":"behavior","user_id":8,"item_id":1,"ts":1767225600000}'
    vals = [b'{"a":[{}', b'{}]}', split, enc(event(user=9)), b'{"s":"', b'"}', enc(event(user=10))]
    recs = [rec(v, i) for i, v in enumerate(vals)]
    assert batch_decode(recs) == reference_decode(recs)
    b, dead = decode_batch(recs)
    assert b.user_raw == ["9", "10"] and [d.record.offset for d in dead] == [0, 1, 2, 4, 5]


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), n_good=st.integers(0, 300), n_bad=st.integers(0, 40))
def test_batch_decode_equals_per_record_reference(seed, n_good, n_bad):
    from tests.pipeline.hostile import hostile_records

    recs = [rec(v, i) for i, (_, v, _) in enumerate(hostile_records(seed, n_good, n_bad))]
    assert batch_decode(recs) == reference_decode(recs)


@settings(max_examples=200, deadline=None)
@given(obj=st.dictionaries(
    st.sampled_from(["type", "user_id", "item_id", "category_id", "action", "ts", "request_id", "context", "x"]),
    st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64), st.floats(allow_nan=True),
              st.text(max_size=5), st.sampled_from(["behavior", "impression", "click", "view", "buy", "1"]),
              st.sampled_from([1_767_225_600_000, 1_767_225_600_000.0, 1]),
              st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2)),
    max_size=9))
def test_any_json_object_decodes_like_the_reference(obj):
    for i in (0, 1, 2, 3):  # warm the id cache with small ints, then mixed types must not collide
        hash_id(i)
    v = json.dumps(obj).encode()
    recs = [rec(v, 0), rec(enc(event()), 1), rec(json.dumps(obj, separators=(",", ":")).encode(), 2)]
    assert batch_decode(recs) == reference_decode(recs)


# ---- the optional orjson parse (pipeline.events._loads_flat_batch) gives json's result ----------

@pytest.mark.parametrize("user", [2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**25, "1" * 30])
def test_integers_past_orjson_range_decode_like_json(user):
    """orjson turns integers outside [-2^63, 2^64) into floats; such a batch must go to json."""
    recs = [rec(enc(event(user=user)), 0), rec(enc(event(item=10**20)), 1), rec(enc(event()), 2)]
    assert batch_decode(recs) == reference_decode(recs)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n_good=st.integers(1, 200), n_bad=st.integers(0, 20))
def test_batch_parse_is_the_same_with_and_without_orjson(seed, n_good, n_bad):
    from pipeline import events as ev
    from tests.pipeline.hostile import hostile_records

    recs = [rec(v, i) for i, (_, v, _) in enumerate(hostile_records(seed, n_good, n_bad))]
    values = [r.value for r in recs]

    def parse():  # repr: NaN != NaN and types must match too; a bad record by its reason
        return repr([("bad", o.reason) if isinstance(o, ev._Bad) else o for o in ev._parse_all(values)])

    with_orjson = parse()
    saved, ev._orjson = ev._orjson, None
    try:
        assert parse() == with_orjson
    finally:
        ev._orjson = saved


# ---- the typed paths (pipeline.events._typed_batch: C fast path, msgspec) give the reference's result

def _without(fn, *paths):
    """``fn()`` with the named optional decoders of pipeline.events switched off."""
    from pipeline import events as ev

    saved = {p: getattr(ev, p) for p in paths}
    try:
        for p in paths:
            setattr(ev, p, None)
        return fn()
    finally:
        for p, v in saved.items():
            setattr(ev, p, v)


def _without_msgspec(fn):  # neither typed decoder: the C fast path is the typed path's too
    return _without(fn, "_msgspec", "_fastdecode")


def _without_c(fn):
    return _without(fn, "_fastdecode")


@pytest.mark.parametrize("value", [
    {"user": 2**63 - 1}, {"user": 2**63}, {"user": -2**63}, {"user": -2**63 - 1}, {"item": 10**30},
    {"category_id": None}, {"request_id": None}, {"request_id": ""}, {"request_id": "r" * 300},
    {"request_id": "é-ünïcode"}, {"user": "é" * 256}, {"user": "é" * 257}, {"action": "x" * 32},
    {"action": "x" * 33}, {"action": "weird"}, {"ts": 1_767_225_600_000.0}, {"user": "\x00"},
    {"kind": "impression", "request_id": "r", "category_id": None},
    {"kind": "click", "request_id": "r"}, {"kind": "click", "request_id": ""},
])
def test_typed_path_edge_values_decode_like_the_reference(value):
    recs = [rec(enc(event()), 0), rec(enc(event(**value)), 1), rec(enc(event(user="u2")), 2)]
    assert batch_decode(recs) == reference_decode(recs)
    assert _without_msgspec(lambda: batch_decode(recs)) == _without_c(lambda: batch_decode(recs)) == batch_decode(recs)


def test_typed_path_duplicate_keys_last_wins_like_json():
    v = b'{"type":"behavior","user_id":"a","item_id":1,"ts":1767225600000,"user_id":5,"ts":1767225600001}'
    recs = [rec(v, 0), rec(enc(event()), 1)]
    assert batch_decode(recs) == reference_decode(recs)
    b, _ = decode_batch(recs)
    assert b.user_raw[0] == "5" and b.ts.tolist()[0] == 1767225600001


def test_plain_stream_takes_the_typed_path(monkeypatch):
    """The benchmark's stream shape (all plain events) never reaches the generic parse."""
    from pipeline import events as ev

    assert ev._msgspec is not None, "msgspec is a dependency (pyproject.toml): the typed path must be available"
    recs = [rec(enc(event("impression", user=i, request_id=f"r{i}")), i) for i in range(50)]
    recs += [rec(enc(event(user=f"u{i}", action="buy", category_id=i)), 50 + i) for i in range(50)]
    expect = reference_decode(recs)
    monkeypatch.setattr(ev, "_parse_all", lambda values: pytest.fail("generic parse used"))
    assert batch_decode(recs) == expect


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n_good=st.integers(1, 200), n_bad=st.integers(0, 5))
def test_batch_decode_is_the_same_with_and_without_msgspec(seed, n_good, n_bad):
    from tests.pipeline.hostile import hostile_records

    recs = [rec(v, i) for i, (_, v, _) in enumerate(hostile_records(seed, n_good, n_bad))]
    assert batch_decode(recs) == _without_msgspec(lambda: batch_decode(recs)) == reference_decode(recs)
    assert _without_c(lambda: batch_decode(recs)) == reference_decode(recs)


# ---- the C fast path (pipeline/_fastdecode.c): a subset of the msgspec path, the same values ------

def _fastdecode():
    from pipeline import events as ev

    assert ev._fastdecode is not None, "pipeline._fastdecode is built by the install (setup.py): make venv"
    return ev._fastdecode


def _c_accepts(values):
    from pipeline import events as ev

    return _fastdecode().decode_plain(values, ev.MAX_EVENT_BYTES, ev.MAX_ID_CHARS, ev.MAX_ACTION_CHARS,
                                      ev.MIN_TS_MS, ev.MAX_TS_MS) is not None


_GOOD = enc(event())
_T = b'"type":"behavior","item_id":1,"ts":1767225600000'


@pytest.mark.parametrize("value,accepted", [
    # the shapes it takes
    (b'{"type":"behavior","user_id":7,"item_id":1,"ts":1767225600000}', True),
    (b' {\t"type" : "behavior",\n"user_id":"u7" ,\r"item_id":1,"ts":1767225600000 } \n', True),
    (b'{"ts":1767225600000,"item_id":-0,"user_id":-12,"type":"click","request_id":"r1","action":"buy"}', True),
    (b'{' + _T + b',"user_id":999999999999999999}', True),  # 18 digits
    (b'{' + _T + b',"user_id":-999999999999999999}', True),
    (b'{' + _T + b',"user_id":"' + b"u" * 256 + b'"}', True),
    (b'{' + _T + b',"user_id":1,"action":"' + b"x" * 32 + b'"}', True),
    (b'{' + _T + b',"user_id":1,"action":""}', True),
    (b'{' + _T + b',"user_id":1,"category_id":null,"request_id":null}', True),
    (b'{' + _T + b',"user_id":" ~!#$%&()*+,-./:;<=>?@[]^_`{|}"}', True),  # printable ASCII, JSON-looking
    (b'{"type":"behavior","user_id":1,"item_id":1,"ts":946684800000}', True),  # the first valid ms
    (b'{"type":"behavior","user_id":1,"item_id":1,"ts":4102444799999}', True),  # the last
    # what it leaves to msgspec (valid or not: the result is msgspec's)
    (b'{' + _T + b',"user_id":1000000000000000000}', False),  # 19 digits
    (b'{' + _T + b',"user_id":9223372036854775808}', False),
    (b'{' + _T + b',"user_id":01}', False),
    (b'{' + _T + b',"user_id":-}', False),
    (b'{' + _T + b',"user_id":1.0}', False),
    (b'{' + _T + b',"user_id":1e3}', False),
    (b'{' + _T + b',"user_id":1E3}', False),
    (b'{' + _T + b',"user_id":true}', False),
    (b'{' + _T + b',"user_id":null}', False),
    (b'{' + _T + b',"user_id":""}', False),
    (b'{' + _T + b',"user_id":"' + b"u" * 257 + b'"}', False),
    (b'{' + _T + b',"user_id":"u\\u0031"}', False),  # an escape
    (b'{' + _T + b',"user_id":"u\\"x"}', False),
    (b'{' + _T + b',"user_id":"\xc3\xa9"}', False),  # UTF-8
    (b'{' + _T + b',"user_id":"a\tb"}', False),  # a raw control character: invalid JSON
    (b'{' + _T + b',"user_id":"\x7f"}', False),
    (b'{' + _T + b',"user_id":[1]}', False),
    (b'{' + _T + b',"user_id":{"a":1}}', False),
    (b'{' + _T + b',"user_id":1,"action":"' + b"x" * 33 + b'"}', False),
    (b'{' + _T + b',"user_id":1,"action":null}', False),
    (b'{' + _T + b',"user_id":1,"request_id":""}', False),
    (b'{' + _T + b',"user_id":1,"context":{}}', False),
    (b'{' + _T + b',"user_id":1,"x":1}', False),
    (b'{' + _T + b',"user_id":1,"user_id":2}', False),  # a repeated field
    (b'{"\\u0074ype":"behavior","user_id":1,"item_id":1,"ts":1767225600000}', False),
    (b'{"type":"Behavior","user_id":1,"item_id":1,"ts":1767225600000}', False),
    (b'{"type":"behavior","user_id":1,"item_id":1,"ts":946684799999}', False),
    (b'{"type":"behavior","user_id":1,"item_id":1,"ts":4102444800000}', False),
    (b'{"type":"behavior","user_id":1,"item_id":1,"ts":"1767225600000"}', False),
    (b'{"type":"behavior","user_id":1,"item_id":1}', False),
    (b'{"type":"behavior","user_id":1,"ts":1767225600000}', False),
    (b'{' + _T + b',"user_id":1,}', False),
    (b'{' + _T + b',"user_id":1', False),
    (b'{' + _T + b',"user_id":1}}', False),
    (b'{' + _T + b',"user_id":1} x', False),
    (b'{' + _T + b',"user_id":1}' + _GOOD, False),
    (b'{' + _T + b' "user_id":1}', False),
    (b'{' + _T + b',"user_id" 1}', False),
    (b'{' + _T + b',"user_id":nul}', False),
    (b'{}', False), (b'', False), (b'[]', False), (b'"a"', False), (b'null', False), (b'{', False),
])
def test_c_fast_path_takes_the_plain_shape_and_leaves_the_rest_with_the_same_result(value, accepted):
    """Alone and beside good records, through the C path, msgspec alone, and the reference: one
    answer. And it is the C path that answers exactly where it should."""
    assert _c_accepts([value]) == accepted
    assert not _c_accepts([_GOOD, value, _GOOD]) or accepted
    for recs in ([rec(value, 0)], [rec(_GOOD, 0), rec(value, 1), rec(_GOOD, 2)]):
        expect = reference_decode(recs)
        assert batch_decode(recs) == expect
        assert _without_c(lambda: batch_decode(recs)) == expect  # noqa: B023


def test_c_fast_path_declines_what_is_not_a_list_of_bytes():
    from pipeline import events as ev

    assert not _c_accepts([_GOOD, None]) and not _c_accepts([_GOOD, bytearray(_GOOD)])
    assert not _c_accepts([b"{" + _T + b',"user_id":"' + b"u" * ev.MAX_EVENT_BYTES + b'"}'])
    assert _c_accepts([]) and _c_accepts([_GOOD] * 3)
    with pytest.raises(TypeError):
        _c_accepts((_GOOD,))


@settings(max_examples=300, deadline=None)
@given(obj=st.dictionaries(
    st.sampled_from(["type", "user_id", "item_id", "category_id", "action", "ts", "request_id", "x"]),
    st.one_of(st.none(), st.booleans(), st.integers(-10**19, 10**19), st.integers(-3, 3), st.floats(),
              st.text(max_size=4), st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=3),
              st.sampled_from(["behavior", "impression", "click", "view", "buy", "fav", "cart", "other"]),
              st.integers(946_684_799_999, 946_684_800_001), st.integers(4_102_444_799_999, 4_102_444_800_000)),
    min_size=3, max_size=8),
    compact=st.booleans())
def test_any_object_decodes_alike_through_the_c_path(obj, compact):
    v = json.dumps(obj, separators=(",", ":") if compact else (", ", ": "), ensure_ascii=False).encode()
    recs = [rec(v, 0)]
    assert batch_decode(recs) == _without_c(lambda: batch_decode(recs)) == reference_decode(recs)


def test_plain_stream_takes_the_c_path(monkeypatch):
    """The benchmark's stream (the synthetic generator's events) never reaches msgspec."""
    from pipeline import events as ev
    from pipeline.datasets.synthetic import SyntheticConfig, generate

    _fastdecode()
    evs = list(generate(SyntheticConfig(users=30, behaviors_per_user=20, impressions_per_user=6, seed=1)).events)
    recs = [rec(json.dumps(e, separators=(",", ":")).encode(), i) for i, e in enumerate(evs)]
    assert {e["type"] for e in evs} == {"behavior", "impression", "click"}
    expect = reference_decode(recs)
    monkeypatch.setattr(ev, "_decode_plain", lambda v: pytest.fail("msgspec used"))
    monkeypatch.setattr(ev, "_parse_all", lambda values: pytest.fail("generic parse used"))
    assert batch_decode(recs) == expect


@settings(max_examples=600, deadline=None)
@given(data=st.one_of(st.binary(max_size=240), st.binary(min_size=100, max_size=240)))
def test_c_xxh3_equals_the_xxhash_package(data):
    """decode_plain hashes ids with its own XXH3-64 (every length branch: 0, 1-3, 4-8, 9-16, 17-128,
    129-240 bytes); it must be the xxhash package's, or stored sequences would change keys."""
    import xxhash

    assert _fastdecode().xxh3_64(data) == xxhash.xxh3_64_intdigest(data)


def test_c_xxh3_lengths_at_every_branch_edge_and_its_limit():
    import xxhash

    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 143, 144, 239, 240):
        for _ in range(20):
            b = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            assert _fastdecode().xxh3_64(b) == xxhash.xxh3_64_intdigest(b), n
    with pytest.raises(ValueError, match="240"):
        _fastdecode().xxh3_64(b"x" * 241)


@pytest.mark.parametrize("n", [1, 16, 17, 128, 129, 240, 241, 256])
def test_c_hashes_ids_of_any_accepted_length_like_hash_id(n):
    """Ids over 240 bytes make their column fall back to the Python hash, with the same values."""
    ids = ["u" * n, "v" * max(1, n - 1), str(-10**17), "0"]
    vals = [enc(event("impression", user=u, item=7, category_id=c, request_id="r"))
            for u, c in zip(ids, reversed(ids), strict=True)]
    cols = _fastdecode().decode_plain(vals, *_limits())
    assert cols is not None
    users_h, items_h, cats_h = cols[2], cols[4], cols[7]
    assert (users_h is None) == (n > 240) and (cats_h is None) == (n > 240) and items_h is not None
    b, dead = decode_batch([rec(v, i) for i, v in enumerate(vals)])
    assert not dead and b.user.tolist() == [hash_id(u) for u in ids]
    assert b.category.tolist() == [hash_id(c) for c in reversed(ids)] and b.item.tolist() == [hash_id(7)] * 4


def _limits():
    from pipeline import events as ev

    return ev.MAX_EVENT_BYTES, ev.MAX_ID_CHARS, ev.MAX_ACTION_CHARS, ev.MIN_TS_MS, ev.MAX_TS_MS


def test_c_fast_path_does_not_leak():
    """References in C: decoded batches and batches declined half-way leave nothing behind."""
    from tests.pipeline.leaks import traced_growth

    good = [enc(event("impression", user=f"u{i}", request_id=f"r{i}", category_id=i)) for i in range(200)]
    declined = good[:150] + [b'{"type":"behavior","user_id":"u","item_id":1.5,"ts":1767225600000}'] + good[150:]

    def run():
        for _ in range(200):
            _c_accepts(good)
            _c_accepts(declined)

    run()
    grown = traced_growth(run, collect=True)
    assert grown < 64 * 1024, f"{grown} bytes left after 400 decodes"


def test_record_batch_round_trip_take_and_lazy_keys():
    from pipeline.events import RecordBatch

    recs = [RawRecord("events", i % 3, 10 + i, None if i == 4 else b"k%d" % i, b"v%d" % i) for i in range(9)]
    b = RecordBatch.from_records(recs)
    assert len(b) == 9 and b.topic == "events" and b.records() == recs and b.record(4) == recs[4]
    calls = []
    lazy = RecordBatch(b.topic, b.partition, b.offset, b.value, lambda: calls.append(1) or [r.key for r in recs])
    part = lazy.take(np.array([1, 4, 8]))
    assert not calls and part.records() == [recs[1], recs[4], recs[8]] and calls == [1]
    assert RecordBatch.from_records([]).records() == [] and len(RecordBatch.from_records([])) == 0
    with pytest.raises(ValueError, match="one topic"):
        RecordBatch.from_records([recs[0], RawRecord("other", 0, 0, None, b"")])


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), n_good=st.integers(0, 100), n_bad=st.integers(0, 10))
def test_decode_of_a_record_batch_equals_decode_of_its_records(seed, n_good, n_bad):
    """The worker decodes columns; dead letters still carry the whole original record."""
    from pipeline.events import RecordBatch
    from tests.pipeline.hostile import hostile_records

    recs = [RawRecord("events", i % 2, i, b"key%d" % i, v) for i, (_, v, _) in enumerate(hostile_records(seed, n_good, n_bad))]
    a, dead_a = decode_batch(RecordBatch.from_records(recs))
    b, dead_b = decode_batch(recs)
    assert dead_a == dead_b and batch_decode(recs) == reference_decode(recs)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("kind", "user", "item", "ts", "partition", "offset"))
    assert (a.user_raw, a.item_raw, a.cat_raw, a.request_id) == (b.user_raw, b.item_raw, b.cat_raw, b.request_id)


def test_integer_id_table_hashes_like_hash_id_through_collisions():
    """The direct-mapped table of integer ids: every answer is hash_id's, whatever shares a slot."""
    from pipeline import events as ev

    rng = np.random.default_rng(3)
    step = 1 << (64 - ev.INT_ID_SLOTS_LOG2)  # not a collision by itself: the slot is a Fibonacci hash
    ids = np.concatenate([rng.integers(-2**63, 2**63 - 1, 3000, dtype=np.int64, endpoint=True),
                          np.array([0, 1, -1, 2**63 - 1, -2**63, step, 2 * step], np.int64),
                          rng.integers(0, 50, 2000, dtype=np.int64)])
    slots = (ids.view(np.uint64) * ev._FIB) >> ev._SLOT_SHIFT
    same = slots[:, None] == slots[None, :]
    assert (same.sum(1) > 1).any()  # some ids collide (the repeats of small ids at least)
    expect = [hash_id(int(v)) for v in ids]
    for _ in range(3):  # cold, warm, and after the colliding ids overwrote each other
        assert ev._int_id_hashes(ids).tolist() == expect
        assert ev._int_id_hashes(ids[::-1].copy()).tolist() == expect[::-1]


@pytest.mark.parametrize("ids", [[1, "1", "01"], ["01", "1"], [7, 8, None], [2**63 - 1, -2**63, 5]])
def test_typed_id_hashes_for_mixed_and_numeric_looking_ids(ids):
    from pipeline import events as ev

    assert ev._typed_hashes(list(ids)).tolist() == [0 if v is None else hash_id(v) for v in ids]
    assert hash_id("01") != hash_id(1)
