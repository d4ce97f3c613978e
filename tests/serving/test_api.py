"""The Score RPC over a real gRPC server on 127.0.0.1: validation, error mapping, metadata,
reflection and metrics."""

from __future__ import annotations

import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.proto import scorer_pb2
from tests.serving.fixtures import TinyConfig, TinyRanker, build_test_ranker
from tests.serving.test_scorer import CATS, ITEMS, direct_scores


def cand(item: str = "i1", cat: str = "c1") -> scorer_pb2.Candidate:
    return scorer_pb2.Candidate(item_id=item, category_id=cat)


@pytest.fixture
def served(make_store, model_dir, start_server):
    store = make_store({"alice": 40, "bob": 200})
    ranker = build_test_ranker("din")
    model_dir.publish(ranker, "1")
    running = start_server(store=store, source=model_dir.source, max_candidates=100, max_message_bytes=16 * 1024)
    return running, ranker, store


def test_scores_over_grpc_match_direct_forward(served):
    running, ranker, store = served
    client = running.client()
    for user in ("alice", "bob", "stranger"):
        scores, name, version = client.score(user, ITEMS, CATS, timeout=5)
        assert (name, version) == ("ctr", "1")
        np.testing.assert_allclose(scores, direct_scores(ranker, store, user), rtol=1e-5, atol=1e-6)


BAD_REQUESTS = [  # (request, field named in the message)
    (scorer_pb2.ScoreRequest(candidates=[cand()]), "user_id"),  # missing user
    (scorer_pb2.ScoreRequest(user_id="u" * 257, candidates=[cand()]), "user_id"),  # id too long
    (scorer_pb2.ScoreRequest(user_id="alice"), "candidates"),  # empty candidate list
    (scorer_pb2.ScoreRequest(user_id="alice", candidates=[cand()] * 101), "candidates"),  # over max (100)
    (scorer_pb2.ScoreRequest(user_id="alice", candidates=[cand(), cand(item="")]), "candidates[1].item_id"),
    (scorer_pb2.ScoreRequest(user_id="alice", candidates=[cand(cat="")]), "candidates[0].category_id"),
    (scorer_pb2.ScoreRequest(user_id="alice", candidates=[cand(), cand(), cand(item="x" * 300)]),
     "candidates[2].item_id"),
    (scorer_pb2.ScoreRequest(user_id="alice", candidates=[cand()], context={"": "v"}), "context"),
    (scorer_pb2.ScoreRequest(user_id="alice", candidates=[cand()], context={f"k{i}": "v" for i in range(65)}),
     "context"),
]


@pytest.mark.parametrize("request_, field", BAD_REQUESTS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_REQUESTS)])
def test_invalid_requests_name_the_field(served, request_, field):
    client = served[0].client()
    with pytest.raises(grpc.RpcError) as err:
        client.score_request(request_, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field), err.value.details()


def test_oversized_message_is_refused(served):
    client = served[0].client()
    big = scorer_pb2.ScoreRequest(user_id="alice", candidates=[cand("i" * 200, "c" * 200)] * 99)
    assert big.ByteSize() > 16 * 1024
    with pytest.raises(grpc.RpcError) as err:
        client.score_request(big, timeout=5)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_context_is_accepted(served):
    client = served[0].client()
    scores, _, _ = client.score("alice", ["i1"], ["c1"], timeout=5, context={"slot": "top", "device": "ios"})
    assert len(scores) == 1


def test_request_id_is_echoed_and_generated(served):
    running = served[0]
    stub_call = running.client()._stub.Score.with_call
    _, call = stub_call(scorer_pb2.ScoreRequest(user_id="alice", candidates=[cand()]), timeout=5,
                        metadata=(("x-request-id", "req-42"),))
    assert ("x-request-id", "req-42") in [(m.key, m.value) for m in call.trailing_metadata()]
    with pytest.raises(grpc.RpcError) as err:  # errors carry it too; a missing one is generated
        stub_call(scorer_pb2.ScoreRequest(user_id=""), timeout=5)
    rid = dict((m.key, m.value) for m in err.value.trailing_metadata())["x-request-id"]
    assert len(rid) == 32


def test_unavailable_until_a_model_is_loaded(make_store, model_dir, start_server):
    running = start_server(store=make_store(), source=model_dir.source, wait_ready=None)
    client = running.client()
    with pytest.raises(grpc.RpcError) as err:
        client.score("alice", ITEMS, CATS, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no model" in err.value.details()


def test_unexpected_errors_are_internal_and_generic(make_store, model_dir, start_server, caplog):
    model_dir.publish(TinyRanker(TinyConfig()), "1")
    running = start_server(store=make_store(), source=model_dir.source)
    running.server.scorer.model.ranker.fail = True  # served model starts raising after warm-up
    with pytest.raises(grpc.RpcError) as err:
        running.client().score("alice", ITEMS, CATS, timeout=5, request_id="boom-1")
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "internal error (request id boom-1)"  # no exception text leaks
    logged = [r for r in caplog.records if r.getMessage() == "unhandled error"]
    assert logged and logged[0].exc_info is not None


def test_reflection_lists_the_services(served):
    channel = served[0].client().channel
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                          timeout=5)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"ctrstream.v1.Scorer", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint(make_store, model_dir, start_server):
    model_dir.publish(build_test_ranker("din"), "7")
    running = start_server(store=make_store(), source=model_dir.source, metrics_port=0)
    client = running.client()
    for _ in range(3):
        client.score("alice", ITEMS, CATS, timeout=5)
    with pytest.raises(grpc.RpcError):
        client.score("", ITEMS, CATS, timeout=5)
    refused = 'ctrstream_scorer_request_seconds_count{code="INVALID_ARGUMENT",method="Score"} 1.0'
    # an aborted RPC is observed as its handler unwinds, which can be just after the client has its
    # status (the abort sends it): wait for that observation, briefly
    deadline = time.monotonic() + 5
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{running.server.metrics_port}/metrics",
                                      timeout=5).read().decode()
        if refused in text or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert 'ctrstream_scorer_request_seconds_count{code="OK",method="Score"} 3.0' in text
    assert refused in text
    assert "ctrstream_scorer_candidates_per_request_sum 111.0" in text  # 3 x 37
    assert 'ctrstream_scorer_encoding_cache_total{outcome="hit"} 2.0' in text
    assert 'ctrstream_scorer_model_info{name="ctr",version="7"} 1.0' in text
    assert "ctrstream_scorer_model_age_seconds" in text
    assert "ctrstream_scorer_encoding_cache_hit_ratio 0.666" in text
