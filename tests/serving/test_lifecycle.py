"""Health transitions, deadlines, overload and graceful stop, over a real server on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeline.state import open_store
from tests.serving.fixtures import TinyConfig, TinyRanker, build_test_ranker, fill_store
from tests.serving.test_scorer import CATS, ITEMS


def wait_for(predicate, timeout: float = 10.0, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(every)


def statuses(client) -> tuple[str, str, str]:
    return client.health(""), client.health("ctrstream.v1.Scorer"), client.health("ranker")


def test_health_not_serving_until_model_then_serving(make_store, model_dir, start_server):
    running = start_server(store=make_store(), source=model_dir.source, wait_ready=None)
    client = running.client()
    assert statuses(client) == ("NOT_SERVING",) * 3  # no model published yet
    model_dir.publish(build_test_ranker("din"), "1")
    wait_for(lambda: statuses(client) == ("SERVING",) * 3)
    assert client.score("alice", ITEMS, CATS, timeout=5)[2] == "1"


def test_health_waits_for_the_store(tmp_path, model_dir, start_server):
    """The LMDB store does not exist yet (no worker ran): NOT_SERVING until it appears."""
    model_dir.publish(build_test_ranker("din"), "1")
    uri = f"lmdb://{tmp_path / 'store'}"
    running = start_server(store=None, store_uri=uri, source=model_dir.source, wait_ready=None)
    client = running.client()
    time.sleep(0.5)  # a few polls: the model loads, the store is still missing
    assert running.server.scorer.model is not None
    assert statuses(client) == ("NOT_SERVING",) * 3
    # the worker creates the store (closed again: LMDB allows one open environment per process;
    # the worker and the scorer are separate processes in real life, see test_e2e.py)
    fill_store(open_store(uri), {"alice": 30}).close()
    wait_for(lambda: statuses(client) == ("SERVING",) * 3)
    _, _, version = client.score("alice", ITEMS, CATS, timeout=5)
    assert version == "1"


def test_ranker_health_reflects_model_age(make_store, model_dir, start_server):
    model_dir.publish(build_test_ranker("din"), "1")
    running = start_server(store=make_store(), source=model_dir.source, max_model_age_s=1.0)
    client = running.client()
    assert statuses(client) == ("SERVING",) * 3
    # the version gets older than 1 s: `ranker` says stale, the process still serves
    wait_for(lambda: client.health("ranker") == "NOT_SERVING", timeout=5)
    assert client.health("") == "SERVING"
    client.score("alice", ITEMS, CATS, timeout=5)
    model_dir.publish(build_test_ranker("din", seed=1), "2")  # a fresh version arrives
    wait_for(lambda: client.health("ranker") == "SERVING", timeout=5)


def test_health_goes_not_serving_on_stop(make_store, model_dir, start_server):
    model_dir.publish(build_test_ranker("din"), "1")
    running = start_server(store=make_store(), source=model_dir.source)
    stub = health_pb2_grpc.HealthStub(running.client().channel)
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
    seen = [next(watch).status]
    stopper = threading.Thread(target=running.thread.stop, kwargs={"grace": 1.0})
    stopper.start()
    try:
        seen.append(next(watch).status)
    except grpc.RpcError:
        pass
    stopper.join(10)
    assert seen[0] == health_pb2.HealthCheckResponse.SERVING
    assert seen[1:] == [health_pb2.HealthCheckResponse.NOT_SERVING]


def test_deadline_too_short_is_refused_by_the_server(make_store, model_dir, start_server):
    model_dir.publish(build_test_ranker("din"), "1")
    running = start_server(store=make_store(), source=model_dir.source, min_deadline_ms=300)
    client = running.client()
    with pytest.raises(grpc.RpcError) as err:
        client.score("alice", ITEMS, CATS, timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "ms of the deadline were left" in err.value.details()  # the server's answer, not the client's
    client.score("alice", ITEMS, CATS, timeout=5)


def test_queued_request_past_its_deadline_is_not_scored(make_store, model_dir, start_server):
    """One worker, a slow model: the second request waits, its deadline passes, and the worker
    refuses it instead of spending 300 ms on a useless answer."""
    model_dir.publish(TinyRanker(TinyConfig(), delay_s=0.3), "1")
    running = start_server(store=make_store(), source=model_dir.source, workers=1, cache_mb=0)
    ranker = running.server.scorer.model.ranker
    calls = []
    original = ranker.forward
    ranker.forward = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    client = running.client()
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(client.score, "alice", ITEMS, CATS, 5.0)
        time.sleep(0.05)
        late = pool.submit(client.score, "bob", ITEMS, CATS, 0.2)
        assert slow.result()[2] == "1"
        with pytest.raises(grpc.RpcError) as err:
            late.result()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(0.1)
    assert len(calls) == 1  # only the first request reached the model


def test_overload_answers_resource_exhausted(make_store, model_dir, start_server):
    model_dir.publish(TinyRanker(TinyConfig(), delay_s=0.5), "1")
    running = start_server(store=make_store(), source=model_dir.source, workers=1, max_queue=1)
    client = running.client()

    def call(i: int) -> str:
        try:
            client.score(f"user{i}", ITEMS, CATS, timeout=10)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(call, i) for i in range(8)]
        time.sleep(0.1)
        t0 = time.monotonic()
        assert client.health("", timeout=1) == "SERVING"  # the loop answers while workers are busy
        health_latency = time.monotonic() - t0
        codes = [f.result() for f in futures]
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes.count("OK") >= 2 and codes.count("RESOURCE_EXHAUSTED") >= 1, codes
    assert health_latency < 0.5  # the two admitted requests hold the worker for >= 1 s
    assert client.score("alice", ITEMS, CATS, timeout=5)[2] == "1"  # recovers once drained


def test_graceful_stop_finishes_in_flight_requests(make_store, model_dir, start_server):
    model_dir.publish(TinyRanker(TinyConfig(), delay_s=0.5), "1")
    running = start_server(store=make_store(), source=model_dir.source)
    client = running.client()
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(client.score, "alice", ITEMS, CATS, 5.0)
        time.sleep(0.15)
        running.thread.stop(grace=3.0)
        assert in_flight.result()[2] == "1"
    with pytest.raises(grpc.RpcError) as err:
        client.score("alice", ITEMS, CATS, timeout=1)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
