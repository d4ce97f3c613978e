"""``ctrstream store stats|dump|digest`` on LMDB and Redis stores (DESIGN.md §6)."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.events import hash_id
from pipeline.state import StateDelta, open_store
from tests.fixtures import make_behaviors


@pytest.fixture(params=["lmdb", pytest.param("redis", marks=pytest.mark.redis)])
def filled_store(request, tmp_path):
    if request.param == "lmdb":
        uri = f"lmdb://{tmp_path}/store"
    else:
        uri = request.getfixturevalue("redis_server").store_uri()
    s = open_store(uri, cap=500)
    s.commit(StateDelta("g", appends={hash_id("alice"): make_behaviors(700, seed=1),
                                      hash_id("bob"): make_behaviors(3, seed=2)},
                        pending_put={b"g\x00k": b"v"}, offsets={("events", 0): 703}))
    digest = s.digest()
    s.close()
    return uri, digest


def run(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out.strip().splitlines()


def test_store_digest_stats_dump(filled_store, capsys):
    uri, digest = filled_store
    assert run(capsys, "store", "digest", "--store", uri) == [digest]
    stats = json.loads(run(capsys, "store", "stats", "--store", uri)[0])
    assert stats["users"] == 2 and stats["behaviors"] == 503 and stats["longest_sequence"] == 500
    assert stats["pending_impressions"] == 1
    (line,) = run(capsys, "store", "dump", "--store", uri, "--user", "alice", "--max-len", "4")
    d = json.loads(line)
    assert d["user_hash"] == hash_id("alice") and (d["start"], d["end"]) == (696, 700)
    assert d["item"] == make_behaviors(700, seed=1).item[-4:].tolist()
    assert len(run(capsys, "store", "dump", "--store", uri)) == 2


@pytest.mark.redis
def test_digest_is_the_same_for_the_same_content_on_both_backends(tmp_path, redis_server, capsys):
    digests = []
    for uri in (f"lmdb://{tmp_path}/a", redis_server.store_uri()):
        s = open_store(uri)
        s.commit(StateDelta("g", appends={5: make_behaviors(300)}, offsets={("events", 1): 300}))
        s.close()
        digests += run(capsys, "store", "digest", "--store", uri)
    assert digests[0] == digests[1] and len(digests[0]) == 64


def test_store_on_a_missing_lmdb_is_one_readable_line(tmp_path, capsys):
    assert main(["store", "stats", "--store", f"lmdb://{tmp_path}/none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "start the worker first" in err[0]
