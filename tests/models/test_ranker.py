"""Every preset: shapes, padding, gradients, determinism, save/load, encode reuse, backend flip."""

from __future__ import annotations

import json

import pytest
import torch

from models import PRESETS, RankerConfig, RankerTrain, build_ranker, load_ranker, save_ranker
from tests.models.conftest import pad_batch

SMALL = {"embed_dim": 8, "over": {"hidden": (16, 8)}}  # tiny but every part present


def small(preset, spec, **kw):
    overrides = dict(SMALL)
    if preset == "diffumin":
        overrides["long"] = {"keep": 5, "sample_steps": 3, "start_step": 20}
    if preset == "dare":
        overrides["long"] = {"top_k": 4, "exact_positions": 8}
    overrides.update(kw)
    return build_ranker(preset, spec, **overrides)


@pytest.mark.parametrize("preset", PRESETS)
def test_shapes_training_and_serving_layouts(preset, spec, make_batch):
    ranker = small(preset, spec).eval()
    assert ranker(make_batch()).shape == (5,)  # U == B == 5, lengths incl. 0 and the max
    serve = make_batch((40,), candidates=13)  # U = 1, 13 candidates (prime)
    assert ranker(serve).shape == (13,)
    assert torch.isfinite(ranker(serve)).all()


@pytest.mark.parametrize("preset", PRESETS)
def test_padding_never_changes_the_output(preset, spec, make_batch):
    ranker = small(preset, spec).eval()
    batch = make_batch()
    ref = ranker(batch)
    wider = pad_batch(batch, extra=9)  # more padding, random ids in every padded slot
    torch.testing.assert_close(ranker(wider), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_encode_once_then_score_equals_forward(preset, spec, make_batch):
    ranker = small(preset, spec).eval()
    serve = make_batch((50,), candidates=11)
    enc = ranker.encode(serve)
    torch.testing.assert_close(ranker(serve, encoded=enc), ranker(serve), rtol=0, atol=0)
    # and the U=1 serving layout scores like the training layout (one row per candidate)
    train_layout = type(serve)(*(t.expand(11, -1) for t in (serve.hist_item, serve.hist_cat,
                                                            serve.hist_action, serve.hist_mask)),
                               serve.cand_item, serve.cand_cat, torch.arange(11))
    torch.testing.assert_close(ranker(train_layout), ranker(serve), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_gradient_reaches_every_trainable_parameter(preset, spec, make_batch):
    ranker = small(preset, spec).train()
    batch = make_batch((5, 9, 64, 30, 12, 40))
    loss, _ = RankerTrain(ranker)(batch, torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0]))
    loss.backward()
    missing = [n for n, p in ranker.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


@pytest.mark.parametrize("preset", PRESETS)
def test_deterministic_under_a_seed(preset, spec, make_batch):
    batch = make_batch()
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    out = []
    for _ in range(2):
        torch.manual_seed(3)
        ranker = small(preset, spec, seed=5)
        loss, _ = RankerTrain(ranker)(batch, labels)
        loss.backward()
        out.append((loss.detach(), ranker.embedding.item.weight.grad.clone()))
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    a, b = small(preset, spec, seed=5), small(preset, spec, seed=6)
    assert not torch.equal(a.embedding.item.weight, b.embedding.item.weight)


@pytest.mark.parametrize("preset", PRESETS)
def test_save_load_round_trip_through_the_config(preset, spec, make_batch, tmp_path):
    ranker = small(preset, spec)
    RankerTrain(ranker)(make_batch(), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))  # move running stats
    ranker.eval()
    save_ranker(ranker, tmp_path / "ckpt")
    doc = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert RankerConfig.from_dict(doc["config"]) == ranker.config
    loaded = load_ranker(tmp_path / "ckpt")
    assert loaded.config == ranker.config and not loaded.training
    batch = make_batch(seed=4)
    torch.testing.assert_close(loaded(batch), ranker(batch), rtol=0, atol=0)


def test_config_round_trip_is_json_safe_and_rejects_unknown_fields(spec):
    for preset in PRESETS:
        cfg = small(preset, spec).config
        assert RankerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    bad = small("sdim", spec).config.to_dict()
    bad["long"]["bogus"] = 1
    with pytest.raises(ValueError, match="bogus"):
        RankerConfig.from_dict(bad)
    with pytest.raises(ValueError, match="unknown preset"):
        build_ranker("nope")


def test_diffumin_saved_before_the_head_options_loads_with_the_papers_head(spec, make_batch, tmp_path):
    """A DiffuMIN checkpoint written before ``head_features``/``generated_scale_init`` existed (its
    config lacks them) rebuilds the architecture it was trained with and loads its weights."""
    old = small("diffumin", spec, long={"keep": 5, "sample_steps": 3, "start_step": 20,
                                        "head_features": "paper", "generated_scale_init": 1.0}).eval()
    save_ranker(old, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    doc = json.loads(path.read_text())
    del doc["config"]["long"]["head_features"], doc["config"]["long"]["generated_scale_init"]
    path.write_text(json.dumps(doc))
    loaded = load_ranker(tmp_path / "ckpt")
    assert loaded.config == old.config
    batch = make_batch(seed=4)
    torch.testing.assert_close(loaded(batch), old(batch), rtol=0, atol=0)


def test_overrides_merge_into_parts(spec):
    r = build_ranker("dare", spec, long={"top_k": 7}, short={"softmax": True})
    assert r.config.long.top_k == 7 and r.config.long.attn_dim == 8
    assert r.config.short.softmax and r.config.short.length == 50
    assert build_ranker("din").config.features.seq_len == 50  # din reads only its window


@pytest.mark.parametrize("preset", PRESETS)
def test_extend_encoding_equals_rebuilt(preset, spec):
    import numpy as np

    from models import build_batch
    from tests.models.conftest import make_history

    ranker = small(preset, spec).eval()
    rng = np.random.default_rng(0)
    old = [make_history(rng, n) for n in (10, 0, 25)]
    new = [make_history(rng, n) for n in (3, 4, 0)]
    both = [type(o).concat([o, n]) for o, n in zip(old, new)]
    cand = rng.integers(1, 200, 6)
    uidx = [0, 1, 2, 0, 1, 2]
    b_old = build_batch(old, cand, cand % 20, spec, user_index=uidx)
    b_new = build_batch(new, cand, cand % 20, spec, user_index=uidx)
    b_both = build_batch(both, cand, cand % 20, spec, user_index=uidx)
    extended = ranker.extend_encoding(ranker.encode(b_old), b_new)
    rebuilt = ranker.encode(b_both)
    torch.testing.assert_close(ranker(b_both, encoded=extended), ranker(b_both, encoded=rebuilt),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_backend_flag_reaches_every_part(preset, spec):
    ranker = small(preset, spec).set_backend("torch")
    from models.base import BackendModule

    parts = [m for m in ranker.modules() if isinstance(m, BackendModule)]
    assert len(parts) >= 3 and all(m.backend.value == "torch" for m in parts)
