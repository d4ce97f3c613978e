"""Hot reload: follow the alias, warm up, swap under load with zero failed requests; a broken
version is skipped; the MLflow registry source against a real SQLite registry."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from serving.model_source import MlflowModelSource, ModelReloader
from serving.scorer import Scorer, ScoringRequest
from tests.serving.fixtures import TinyConfig, TinyRanker, build_test_ranker, real_models
from tests.serving.test_lifecycle import wait_for
from tests.serving.test_scorer import CATS, ITEMS, direct_scores


def test_hot_reload_under_concurrent_load_has_zero_errors(make_store, model_dir, start_server):
    store = make_store({f"user{i}": 30 + 7 * i for i in range(8)})
    rankers = {str(v): build_test_ranker("din", seed=v) for v in (1, 2, 3)}
    model_dir.publish(rankers["1"], "1")
    running = start_server(store=store, source=model_dir.source, poll_interval_s=0.05, workers=2)
    stop = threading.Event()
    errors: list[str] = []
    seen: list[list[str]] = [[] for _ in range(4)]

    def hammer(k: int) -> None:
        client = running.client()
        i = 0
        while not stop.is_set():
            try:
                _, _, version = client.score(f"user{(i + k) % 8}", ITEMS, CATS, timeout=5)
                seen[k].append(version)
            except grpc.RpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
            i += 1

    with ThreadPoolExecutor(4) as pool:
        for k in range(4):
            pool.submit(hammer, k)
        time.sleep(0.3)
        for v in ("2", "3"):
            model_dir.publish(rankers[v], v)
            wait_for(lambda v=v: running.server.scorer.model.version == v, timeout=10)
            time.sleep(0.3)
        stop.set()
    assert errors == []
    for versions in seen:
        assert versions and versions[0] == "1" and versions[-1] == "3"
        assert versions == sorted(versions, key=int)  # never back to an older model
    assert sum(len(v) for v in seen) > 40
    # after the swaps the cache answers with the new model, not with v1's encodings
    client = running.client()
    scores, _, version = client.score("user3", ITEMS, CATS, timeout=5)
    assert version == "3"
    np.testing.assert_allclose(scores, direct_scores(rankers["3"], store, "user3"), rtol=1e-5, atol=1e-6)


def test_broken_version_is_skipped_and_the_old_model_keeps_serving(make_store, model_dir):
    store = make_store()
    scorer = Scorer(store)
    reloader = ModelReloader(scorer, model_dir.source)
    model_dir.publish(build_test_ranker("din"), "1")
    assert reloader.check_once() is True and scorer.model.version == "1"
    assert reloader.check_once() is False  # unchanged alias: nothing to do
    model_dir.publish(TinyRanker(TinyConfig(), fail=True), "2")  # fails its warm-up
    assert reloader.check_once() is False
    assert scorer.model.version == "1" and reloader.failures == 1 and "version 2" in reloader.last_error
    assert reloader.check_once() is False and reloader.failures == 1  # not retried until the alias moves
    model_dir.source.set_alias("404")  # a version that does not exist
    assert reloader.check_once() is False and scorer.model.version == "1"
    model_dir.publish(build_test_ranker("din", seed=3), "3")
    assert reloader.check_once() is True and scorer.model.version == "3"
    scorer.score(ScoringRequest("alice", ITEMS, CATS))


def test_directory_source_without_alias_file_takes_the_highest_version(model_dir):
    assert model_dir.source.current_version() is None
    for v in ("2", "10", "9"):
        model_dir.publish(build_test_ranker("din"), v, set_alias=False)
    assert model_dir.source.current_version() == "10"
    model_dir.source.set_alias("9")
    assert model_dir.source.current_version() == "9"


def test_mlflow_registry_source(tmp_path, make_store):
    """Real SQLite registry: the trainer's log_ranker_version, then alias moves are followed."""
    models = real_models()
    assert models is not None, "models.save_ranker/load_ranker must exist"
    import mlflow
    from mlflow import MlflowClient

    from models.registry import log_ranker_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("serving-test", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    source = MlflowModelSource("ctr", alias="champion", tracking_uri=uri)
    assert source.current_version() is None  # nothing registered yet

    r1, r2 = build_test_ranker("din", seed=1), build_test_ranker("din", seed=2)
    v1 = log_ranker_version(client, run.info.run_id, r1, "ctr", tags={})
    # the source must use its own tracking URI, not the process-global one the trainer set
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert source.current_version() is None  # registered, but no champion alias yet
    client.set_registered_model_alias("ctr", "champion", v1)
    assert source.current_version() == v1
    store = make_store()
    scorer = Scorer(store)
    reloader = ModelReloader(scorer, source)
    assert reloader.check_once() is True
    assert scorer.model.created_at is not None
    res = scorer.score(ScoringRequest("alice", ITEMS, CATS))
    np.testing.assert_allclose(res.scores, direct_scores(r1, store, "alice"), rtol=1e-5, atol=1e-6)

    mlflow.set_tracking_uri(uri)
    v2 = log_ranker_version(client, run.info.run_id, r2, "ctr", tags={})
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    assert reloader.check_once() is False  # challenger only: champion has not moved
    client.set_registered_model_alias("ctr", "champion", v2)
    assert reloader.check_once() is True and scorer.model.version == v2
    res = scorer.score(ScoringRequest("alice", ITEMS, CATS))
    np.testing.assert_allclose(res.scores, direct_scores(r2, store, "alice"), rtol=1e-5, atol=1e-6)
    client.set_terminated(run.info.run_id)
