"""The scoring domain: no train/serve skew, encoding cache, unknown users, model swaps."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from models.features import build_batch
from pipeline.events import hash_id
from pipeline.state import StateDelta
from serving.errors import DeadlineTooShort, ModelNotLoaded, StoreUnavailable
from serving.scorer import CacheOutcome, EncodingCache, LoadedModel, Scorer, ScoringRequest, _compact, _Entry
from tests.serving.fixtures import TinyConfig, TinyRanker, behaviors, build_test_ranker, real_models

ITEMS = [f"i{k}" for k in range(37)]  # prime count: no accidental power-of-two shapes
CATS = [f"c{k % 7}" for k in range(37)]
PRESETS = ["din", "din_long", "sdim", "dare"] if real_models() is not None else ["tiny"]


def direct_scores(ranker, store, user: str, items=ITEMS, cats=CATS) -> np.ndarray:
    """What the trainer computes: build_batch on the store read + ranker.forward, no encoding reuse."""
    hist = store.read(hash_id(user), max_len=ranker.config.features.seq_len)
    batch = build_batch([hist], [hash_id(i) for i in items], [hash_id(c) for c in cats],
                        ranker.config.features, user_index=np.zeros(len(items), np.int64))
    with torch.inference_mode():
        return torch.sigmoid(ranker(batch)).numpy()


@pytest.mark.parametrize("preset", PRESETS)
def test_scores_match_build_batch_and_forward(make_store, preset):
    """No skew: the served scores equal build_batch + ranker.forward on the same inputs, for a
    short user, a user longer than the window (64), on the miss, the hit and the extension path."""
    store = make_store({"alice": 40, "bob": 200})
    ranker = build_test_ranker(preset)
    scorer = Scorer(store, LoadedModel(ranker, "ctr", "1"))
    for user in ("alice", "bob"):
        first = scorer.score(ScoringRequest(user, ITEMS, CATS))
        assert first.cache == CacheOutcome.MISS
        np.testing.assert_allclose(first.scores, direct_scores(ranker, store, user), rtol=1e-5, atol=1e-6)
        again = scorer.score(ScoringRequest(user, ITEMS, CATS))
        assert again.cache == CacheOutcome.HIT
        np.testing.assert_array_equal(again.scores, first.scores)
    assert first.model_name == "ctr" and first.model_version == "1"
    assert first.scores.dtype == np.float32 and first.scores.shape == (37,)

    # new behaviors arrive: alice (40 + 10 <= 64) can always be extended; bob's window slides
    store.commit(StateDelta("test", appends={hash_id("alice"): behaviors(10, seed=7),
                                             hash_id("bob"): behaviors(5, seed=8)}))
    for user in ("alice", "bob"):
        res = scorer.score(ScoringRequest(user, ITEMS, CATS))
        assert res.cache in (CacheOutcome.EXTEND, CacheOutcome.MISS)
        np.testing.assert_allclose(res.scores, direct_scores(ranker, store, user), rtol=1e-5, atol=1e-6)
    assert scorer.score(ScoringRequest("alice", ITEMS, CATS)).cache == CacheOutcome.HIT


@pytest.mark.parametrize("preset", PRESETS)
def test_extension_path_is_taken_when_exact(make_store, preset):
    store = make_store({"carol": 20})
    scorer = Scorer(store, LoadedModel(build_test_ranker(preset), "ctr", "1"))
    scorer.score(ScoringRequest("carol", ITEMS, CATS))
    store.commit(StateDelta("test", appends={hash_id("carol"): behaviors(3, seed=3)}))
    res = scorer.score(ScoringRequest("carol", ITEMS, CATS))
    assert res.cache == CacheOutcome.EXTEND  # 20 + 3 <= 64: exact for every model kind
    assert res.history_len == 23


def _fresh_encoding(ranker, store, user: str) -> dict[str, torch.Tensor]:
    hist = store.read(hash_id(user), max_len=ranker.config.features.seq_len)
    with torch.inference_mode():
        return ranker.encode(build_batch([hist], [], [], ranker.config.features, user_index=[]))


def test_sdim_full_window_is_extended_with_evictions(make_store):
    """A full SDIM window slides incrementally: the behaviors that fall out are subtracted from the
    bucket sums, and the result equals a fresh encode of the new window (incremental == rebuilt),
    served scores included, over many small appends."""
    assert real_models() is not None, "the real SDIM ranker must exist"
    store = make_store({"dave": 64})  # SPEC.seq_len = 64: the window is full from the start
    ranker = build_test_ranker("sdim")
    scorer = Scorer(store, LoadedModel(ranker, "ctr", "1"))
    assert scorer.score(ScoringRequest("dave", ITEMS, CATS)).cache == CacheOutcome.MISS
    for step in range(12):
        store.commit(StateDelta("test", appends={hash_id("dave"): behaviors(1 + step % 3, seed=40 + step)}))
        res = scorer.score(ScoringRequest("dave", ITEMS, CATS))
        assert res.cache == CacheOutcome.EXTEND and res.history_len == 64
        np.testing.assert_allclose(res.scores, direct_scores(ranker, store, "dave"), rtol=1e-5, atol=1e-6)
        cached = scorer.cache.get(("1", hash_id("dave")))
        fresh = _fresh_encoding(ranker, store, "dave")
        assert torch.equal(cached.encoding["sdim_counts"], fresh["sdim_counts"])
        torch.testing.assert_close(cached.encoding["sdim_sums"], fresh["sdim_sums"], rtol=1e-5, atol=1e-6)
        empty = fresh["sdim_counts"] == 0  # emptied buckets hold an exact 0, not rounding residue
        assert bool((cached.encoding["sdim_sums"][empty] == 0).all())
        torch.testing.assert_close(cached.encoding["short_emb"], fresh["short_emb"])


def test_sdim_incremental_drift_is_bounded_by_a_rebuild(make_store):
    """Once the behaviors added and subtracted incrementally exceed seq_len, the user is re-encoded."""
    store = make_store({"erin": 64})
    scorer = Scorer(store, LoadedModel(build_test_ranker("sdim"), "ctr", "1"))
    scorer.score(ScoringRequest("erin", ITEMS, CATS))
    outcomes = []
    for step in range(3):  # 3 x (20 added + 20 evicted) = 120 > 64 at the 2nd append
        store.commit(StateDelta("test", appends={hash_id("erin"): behaviors(20, seed=60 + step)}))
        outcomes.append(scorer.score(ScoringRequest("erin", ITEMS, CATS)).cache)
    assert outcomes == [CacheOutcome.EXTEND, CacheOutcome.MISS, CacheOutcome.EXTEND]


def test_sdim_extension_falls_back_when_evicted_behaviors_are_gone(make_store):
    """If the lifelong cap trimmed the behaviors that leave the window, the user is re-encoded."""
    from pipeline.state import open_store

    store = open_store("memory://", cap=70)
    store.commit(StateDelta("test", appends={hash_id("fay"): behaviors(64, seed=1)}))
    ranker = build_test_ranker("sdim")
    scorer = Scorer(store, LoadedModel(ranker, "ctr", "1"))
    scorer.score(ScoringRequest("fay", ITEMS, CATS))
    store.commit(StateDelta("test", appends={hash_id("fay"): behaviors(10, seed=2)}))  # trims the oldest 4
    res = scorer.score(ScoringRequest("fay", ITEMS, CATS))
    assert res.cache in (CacheOutcome.EXTEND, CacheOutcome.MISS)
    np.testing.assert_allclose(res.scores, direct_scores(ranker, store, "fay"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_unknown_user_scores_with_empty_history(make_store, preset):
    store = make_store({"alice": 40})
    ranker = build_test_ranker(preset)
    scorer = Scorer(store, LoadedModel(ranker, "ctr", "1"))
    res = scorer.score(ScoringRequest("never-seen", ITEMS, CATS))
    assert res.history_len == 0 and res.cache == CacheOutcome.EMPTY
    assert np.isfinite(res.scores).all()
    np.testing.assert_allclose(res.scores, direct_scores(ranker, store, "never-seen"), rtol=1e-5, atol=1e-6)
    # the empty-history encoding is shared, not cached per unknown user
    scorer.score(ScoringRequest("another-stranger", ITEMS, CATS))
    assert len(scorer.cache) == 1


def test_ranker_without_encode_uses_plain_forward(make_store):
    store = make_store({"alice": 40})

    class PlainForward(torch.nn.Module):  # a model with forward(batch) only
        def __init__(self) -> None:
            super().__init__()
            self.inner = TinyRanker()
            self.config = self.inner.config

        def forward(self, batch):
            return self.inner(batch)

    ranker = PlainForward().eval()
    scorer = Scorer(store, LoadedModel(ranker, "ctr", "1"))
    res = scorer.score(ScoringRequest("alice", ITEMS, CATS))
    assert res.cache == CacheOutcome.NONE
    np.testing.assert_allclose(res.scores, direct_scores(ranker, store, "alice"), rtol=1e-6)


def test_not_ready_errors(make_store):
    with pytest.raises(ModelNotLoaded):
        Scorer(make_store()).score(ScoringRequest("alice", ITEMS, CATS))
    with pytest.raises(StoreUnavailable):
        Scorer(None, LoadedModel(TinyRanker(), "ctr", "1")).score(ScoringRequest("alice", ITEMS, CATS))


def test_expired_deadline_is_refused(make_store):
    import time

    scorer = Scorer(make_store(), LoadedModel(TinyRanker(), "ctr", "1"), min_budget_s=0.005)
    with pytest.raises(DeadlineTooShort):
        scorer.score(ScoringRequest("alice", ITEMS, CATS), deadline=time.monotonic() + 0.001)
    scorer.score(ScoringRequest("alice", ITEMS, CATS), deadline=time.monotonic() + 5)


def test_cache_is_bounded_in_bytes_and_per_version():
    def entry(nbytes: int) -> _Entry:
        return _Entry(end=1, window=1, encoding={"x": torch.zeros(nbytes // 4)}, nbytes=nbytes)

    cache = EncodingCache(max_bytes=1000)
    for u in range(5):
        cache.put(("1", u), entry(300))
    assert cache.nbytes <= 1000 and len(cache) == 3
    assert cache.get(("1", 0)) is None and cache.get(("1", 4)) is not None  # LRU order
    cache.put(("1", 99), entry(5000))  # larger than the whole budget: not cached
    assert cache.get(("1", 99)) is None
    cache.put(("2", 1), entry(100))
    cache.drop_versions_except("2")
    assert len(cache) == 1 and cache.nbytes == 100


def test_cached_views_do_not_pin_their_base_tensor():
    """A short-window view of a 10,000-long embedding must not keep the whole buffer in the cache."""
    hist_emb = torch.zeros(1, 10_000, 32)  # (U, L, d)
    enc = {"short_emb": hist_emb[:, :50], "short_mask": torch.ones(1, 50, dtype=torch.bool),
           "alias": hist_emb[:, :50]}
    out, nbytes = _compact(enc)
    assert out["short_emb"].untyped_storage().nbytes() == 50 * 32 * 4
    assert nbytes == 50 * 32 * 4 * 2 + 50  # storages are counted, each once
    torch.testing.assert_close(out["short_emb"], enc["short_emb"])


def test_swap_keeps_in_flight_requests_on_their_model(make_store):
    """A request that started on v1 finishes on v1 even if v2 is swapped in meanwhile."""
    store = make_store({"alice": 40})
    started, release = threading.Event(), threading.Event()

    class Gate(TinyRanker):
        def forward(self, batch, encoded=None):
            started.set()
            release.wait(5)
            return super().forward(batch, encoded)

    scorer = Scorer(store, LoadedModel(Gate().eval(), "ctr", "1"))
    out = {}
    t = threading.Thread(target=lambda: out.update(r=scorer.score(ScoringRequest("alice", ITEMS, CATS))))
    t.start()
    assert started.wait(5)
    old = scorer.swap(LoadedModel(TinyRanker(TinyConfig(seed=1)).eval(), "ctr", "2"))
    release.set()
    t.join(5)
    assert old is not None and old.version == "1"
    assert out["r"].model_version == "1"
    assert scorer.score(ScoringRequest("alice", ITEMS, CATS)).model_version == "2"


def test_warm_up_rejects_a_broken_model(make_store):
    scorer = Scorer(make_store())

    class Broken(TinyRanker):
        def forward(self, batch, encoded=None):
            return torch.full((batch.num_candidates,), float("nan"))

    with pytest.raises(ValueError, match="warm-up"):
        scorer.warm_up(LoadedModel(Broken().eval(), "ctr", "1"))
    scorer.warm_up(LoadedModel(build_test_ranker(PRESETS[0]), "ctr", "1"))
