"""The backend flag flips a whole ranker between the torch reference and the Triton kernels
(STYLE R10): same logits and gradients, and a short training run follows the same trajectory.

Runs the Triton kernels under the interpreter on CPU (``TRITON_INTERPRET=1``, set by the root
conftest when no GPU is visible) and compiled on a GPU. Shapes are tiny: the interpreter runs one
program instance at a time.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from models import FeatureSpec, RankerTrain, build_batch, build_ranker
from tests.models.conftest import make_history
from triton_kernels import Backend
from triton_kernels.backend import reset_resolution_log, resolution_counts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPEC = FeatureSpec(seq_len=19, item_buckets=61, category_buckets=11)  # L = 19 > a 16-wide tile
TINY = {"embed_dim": 4, "short": {"length": 5, "hidden": 6}, "over": {"hidden": (8,)}}
LONG = {"din_long": {"hidden": 6}, "dare": {"top_k": 4, "attn_dim": 4, "pos_dim": 4, "attn_pos_dim": 4,
                                             "exact_positions": 8},
        "sdim": {"num_hashes": 4, "hash_bits": 2}, "diffumin": {"keep": 4, "sample_steps": 2, "start_step": 10,
                                                                 "layers": 1}}
# the ops each preset must have run on Triton (R6: the Triton path was really exercised)
OPS = {"din": {"target_attention"}, "din_long": {"target_attention"}, "sdim": {"sdim_hash", "sdim_gather"},
       "dare": {"dare_search"}, "diffumin": {"target_attention"}}

pytestmark = pytest.mark.skipif(DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)")


def _batch(seed: int, b: int = 5):
    rng = np.random.default_rng(seed)
    hs = [make_history(rng, n, items=60, cats=10) for n in (0, 3, 19, 11, 7)][:b]
    ci = rng.integers(1, 60, b)
    return build_batch(hs, ci, ci % 10, SPEC).to(DEVICE)


def _pair(preset: str):
    kw = dict(TINY)
    if preset in LONG:
        kw["long"] = LONG[preset]
    return [build_ranker(preset, SPEC, seed=3, **kw).to(DEVICE).set_backend(b)
            for b in (Backend.TORCH, Backend.TRITON)]


@pytest.mark.interpret
@pytest.mark.parametrize("preset", ["din", "din_long", "sdim", "dare", "diffumin"])
def test_torch_and_triton_backends_agree(preset):
    ref, tri = _pair(preset)
    batch = _batch(0)
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], device=DEVICE)
    reset_resolution_log()
    grads = []
    for model in (ref, tri):
        torch.manual_seed(0)
        loss, _ = RankerTrain(model)(batch, labels)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)
    ref.eval(), tri.eval()
    torch.testing.assert_close(tri(batch), ref(batch), rtol=1e-4, atol=1e-5)
    ran = {op for (op, b), n in resolution_counts().items() if b is Backend.TRITON and n}
    assert OPS[preset] <= ran, f"Triton never ran {OPS[preset] - ran}"


@pytest.mark.interpret
@pytest.mark.convergence
@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dare"])
def test_training_trajectories_match_across_backends(preset):
    """Liger-style convergence: 20 steps over a fixed stream, both backends from the same weights.

    Loss curves are compared under Adam (the trainer's optimiser). Final weights are compared after
    an SGD run with the same tolerance: Adam divides by sqrt(v) + 1e-8, so on a parameter whose true
    gradient is ~0 (DARE's aux-head BatchNorm scale early on) it turns the ~1e-9 difference of two
    correct summation orders (atomics in the Triton backward) into a full ±lr step — a property of
    Adam, not of the kernels. Under SGD every weight agrees to ~1e-7 (a flipped top-K would not)."""
    for optim in ("adam", "sgd"):
        models = _pair(preset)
        curves = []
        for model in models:
            opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if optim == "adam"
                   else torch.optim.SGD(model.parameters(), lr=1e-2))
            train = RankerTrain(model)
            torch.manual_seed(0)
            curve = []
            for step in range(20):
                batch = _batch(step)
                labels = (batch.cand_item % 2).float()
                loss, _ = train(batch, labels)
                opt.zero_grad()
                loss.backward()
                opt.step()
                curve.append(loss.item())
            curves.append(curve)
        np.testing.assert_allclose(curves[1], curves[0], rtol=1e-3, atol=1e-4)
        if optim == "adam":
            assert np.mean(curves[0][-2:]) < np.mean(curves[0][:2])  # it learns
            continue
        for (n, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=n)
