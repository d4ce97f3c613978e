"""Per-model mechanism tests: SDIM hashing law and code identity, DARE decoupling and K = L,
DiffuMIN orthonormal channels and a learning diffusion loss, DIN softmax/no-softmax and Dice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import RankerTrain, build_batch, build_ranker
from models.arch.attention import DiffuMINArch, DINAttention
from models.arch.layers import Dice
from models.arch.sequence import SDIMSequenceArch, full_softmax_attention
from models.config import DiffuMINConfig, DINConfig, SDIMConfig
from tests.models.conftest import make_history
from triton_kernels import dare_search

# ---- SDIM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [math.pi / 6, math.pi / 3, math.pi / 2, 2 * math.pi / 3])
def test_sdim_collision_rate_matches_simhash_law(theta):
    """P[all τ bits of a group agree] = (1 − θ/π)^τ for unit vectors at angle θ (papers.md §2(a) 5)."""
    d, tau, groups, pairs = 16, 3, 16, 3000  # 48,000 group trials: std of the rate < 0.003
    arch = SDIMSequenceArch(d, SDIMConfig(num_hashes=groups, hash_bits=tau, seed=11))
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(pairs, d, generator=g), dim=-1)
    r = torch.randn(pairs, d, generator=g)
    ortho = torch.nn.functional.normalize(r - (r * x).sum(-1, keepdim=True) * x, dim=-1)
    y = math.cos(theta) * x + math.sin(theta) * ortho  # exactly at angle θ from x
    same = arch.codes(x.unsqueeze(1)) == arch.codes(y.unsqueeze(1))  # (pairs, 1, G)
    assert abs(same.float().mean().item() - (1 - theta / math.pi) ** tau) < 0.02


def test_sdim_codes_identical_between_batch_and_per_user_paths(spec):
    """Bucket codes and counts of a user do not depend on who else is in the batch (or padding)."""
    ranker = build_ranker("sdim", spec, embed_dim=8).eval()
    rng = np.random.default_rng(2)
    hs = [make_history(rng, n) for n in (3, 64, 0, 17)]
    cand = rng.integers(1, 200, 4)
    batch = build_batch(hs, cand, cand % 20, spec)
    enc = ranker.encode(batch)
    emb = ranker.embedding(batch.hist_item, batch.hist_cat)
    codes = ranker.long.codes(emb)  # (U, L, G)
    for u, h in enumerate(hs):
        one = build_batch([h], cand[u:u + 1], cand[u:u + 1] % 20, spec)
        e1 = ranker.encode(one)
        n = len(h)
        c1 = ranker.long.codes(ranker.embedding(one.hist_item, one.hist_cat))
        assert torch.equal(c1[0, :n], codes[u, :n])
        assert torch.equal(e1["sdim_counts"][0], enc["sdim_counts"][u])
        torch.testing.assert_close(e1["sdim_sums"][0], enc["sdim_sums"][u])


def test_sdim_incremental_table_equals_rebuilt(spec):
    ranker = build_ranker("sdim", spec, embed_dim=8).eval()
    rng = np.random.default_rng(3)
    old = [make_history(rng, n) for n in (20, 0, 33)]
    new = [make_history(rng, n) for n in (5, 9, 0)]
    both = [type(o).concat([o, n]) for o, n in zip(old, new)]
    none = np.zeros(0, dtype=np.int64)
    enc_old = ranker.encode(build_batch(old, none, none, spec, user_index=none))
    extended = ranker.extend_encoding(enc_old, build_batch(new, none, none, spec, user_index=none))
    rebuilt = ranker.encode(build_batch(both, none, none, spec, user_index=none))
    assert torch.equal(extended["sdim_counts"], rebuilt["sdim_counts"])
    torch.testing.assert_close(extended["sdim_sums"], rebuilt["sdim_sums"])
    torch.testing.assert_close(extended["short_emb"], rebuilt["short_emb"])
    assert torch.equal(extended["short_mask"], rebuilt["short_mask"])


def test_sdim_projection_is_a_saved_buffer_and_seeded(spec):
    a = build_ranker("sdim", spec, seed=1)
    b = build_ranker("sdim", spec, seed=2)  # parameter seed differs, projection seed does not
    assert "long.projection" in a.state_dict()
    assert not a.long.projection.requires_grad
    assert torch.equal(a.long.projection, b.long.projection)
    c = build_ranker("sdim", spec, long={"seed": 9})
    assert not torch.equal(a.long.projection, c.long.projection)


def test_sdim_target_gets_no_gradient_from_the_long_branch(spec, make_batch):
    ranker = build_ranker("sdim", spec, embed_dim=8, short=None).eval()
    batch = make_batch()
    hist = ranker.embedding(batch.hist_item, batch.hist_cat).detach().requires_grad_(True)
    target = ranker.embedding(batch.cand_item, batch.cand_cat).detach().requires_grad_(True)
    out, _ = ranker.long(ranker.long.encode(hist, batch), target, batch)
    out.sum().backward()
    assert target.grad is None and hist.grad is not None and hist.grad.abs().sum() > 0


# ---- DARE -----------------------------------------------------------------------------------------


def test_dare_search_with_k_equal_l_is_full_attention():
    g = torch.Generator().manual_seed(0)
    u, length, b, da, dr = 3, 13, 7, 6, 5  # prime-ish sizes
    q, keys = torch.randn(b, da, generator=g), torch.randn(u, length, da, generator=g)
    values, pos = torch.randn(u, length, dr, generator=g), torch.randn(length, generator=g)
    mask = torch.arange(length).unsqueeze(0) < torch.tensor([[13], [4], [0]])  # full, short, empty
    uidx = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    out, _, _ = dare_search(q, keys, values, mask, uidx, pos, top_k=length)
    torch.testing.assert_close(out, full_softmax_attention(q, keys, values, mask, uidx, pos))


def test_dare_module_with_k_at_least_l_equals_full_attention(spec, make_batch):
    ranker = build_ranker("dare", spec, embed_dim=8, long={"top_k": 64}).eval()  # K = seq_len
    batch = make_batch()
    enc = ranker.encode(batch)
    target = ranker.embedding(batch.cand_item, batch.cand_cat)
    query, values, pos_logits, r_t = ranker.long._search_inputs(enc, target, batch)
    h = full_softmax_attention(query, enc["dare_keys"], values, enc["long_mask"], batch.user_index, pos_logits)
    out, _ = ranker.long(enc, target, batch)
    torch.testing.assert_close(out, torch.cat([h, r_t * h], -1))


def test_dare_attention_and_representation_tables_get_different_gradients(spec, make_batch):
    """Same width, same initial rows: decoupled roles still receive different gradients."""
    ranker = build_ranker("dare", spec, embed_dim=8, short=None, long={"attn_dim": 8})
    with torch.no_grad():
        ranker.long.attn_item.weight.copy_(ranker.embedding.item.weight)
    batch = make_batch((30, 64, 12, 50, 7))
    loss, _ = RankerTrain(ranker)(batch, torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))
    loss.backward()
    g_att, g_rep = ranker.long.attn_item.weight.grad, ranker.embedding.item.weight.grad
    rows = torch.unique(batch.hist_item[batch.hist_mask])
    assert g_att[rows].abs().sum() > 0 and g_rep[rows].abs().sum() > 0
    assert not torch.allclose(g_att[rows], g_rep[rows])


def test_dare_aux_loss_gives_unselected_behaviors_attention_gradient(spec, make_batch):
    """Without the aux head the attention table learns only from the K selected behaviors."""
    batch = make_batch((64, 64, 64))  # 3 users: top-2 search rows (6) + the 3 candidates (queries)
    grads = {}
    for w in (0.0, 1.0):
        ranker = build_ranker("dare", spec, embed_dim=8, short=None, long={"top_k": 2, "aux_weight": w})
        loss, _ = RankerTrain(ranker)(batch, torch.tensor([1.0, 0.0, 1.0]))
        loss.backward()
        g = ranker.long.attn_item.weight.grad
        grads[w] = int((g[torch.unique(batch.hist_item[batch.hist_mask])].abs().sum(-1) > 0).sum())
    assert grads[0.0] <= 9 < grads[1.0]


# ---- DiffuMIN -------------------------------------------------------------------------------------


def test_diffumin_channels_are_orthonormal_with_fixed_signs():
    arch = DiffuMINArch(16, DiffuMINConfig(channels=4))
    target = torch.randn(9, 16)
    q = arch.channels(target)  # (B, d, c)
    eye = torch.eye(4).expand(9, 4, 4)
    torch.testing.assert_close(q.transpose(1, 2) @ q, eye, atol=1e-5, rtol=0)
    x = arch.project(target).view(9, 4, 16).transpose(1, 2)
    assert ((q.transpose(1, 2) @ x).diagonal(dim1=-2, dim2=-1) > 0).all()  # diag(R) > 0
    torch.testing.assert_close(arch.channels(target[3:4]), q[3:4])  # same bases alone or in a batch


def test_diffumin_diffusion_loss_decreases_on_a_toy_task():
    torch.manual_seed(0)
    cfg = DiffuMINConfig(channels=2, heads=2, layers=1)
    arch = DiffuMINArch(8, cfg).train()
    protos = torch.nn.functional.normalize(torch.randn(3, 2, 8), dim=-1)  # 3 users' interest pairs
    opt = torch.optim.Adam(arch.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        x0 = protos[torch.randint(0, 3, (32,))]  # (32, c, d)
        bases = arch.channels(torch.randn(32, 8))
        loss = arch.diffusion_loss(x0, bases)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])


def test_diffumin_all_three_losses_are_wired_in(spec, make_batch):
    ranker = build_ranker("diffumin", spec, embed_dim=8, long={"keep": 5, "sample_steps": 3, "start_step": 20})
    train = RankerTrain(ranker)
    train(make_batch(), torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]))
    assert {"bce", "diffumin_diffusion", "diffumin_contrastive"} <= set(train.last_components)
    assert all(v > 0 for v in train.last_components.values())


def test_diffumin_inference_is_deterministic(spec, make_batch):
    ranker = build_ranker("diffumin", spec, embed_dim=8).eval()
    batch = make_batch()
    torch.manual_seed(1)
    a = ranker(batch)
    torch.manual_seed(2)
    assert torch.equal(a, ranker(batch))


def test_diffumin_matched_head_features(spec, make_batch):
    """``matched`` = [log|r_c|, cos(r_c, e_s), r, r*]; ``paper`` = [r, r*]; same r and r* in both.
    The log-norm ignores the overall scale of r (1/L, embedding scale) up to a constant."""
    c, d = 2, 8
    batch = make_batch()
    torch.manual_seed(0)
    emb, target = torch.randn(5, 64, d), torch.randn(5, d)
    out = {}
    weights = DiffuMINArch(d, DiffuMINConfig(channels=c)).state_dict()
    for kind in ("matched", "paper"):
        arch = DiffuMINArch(d, DiffuMINConfig(channels=c, keep=5, sample_steps=2, start_step=5,
                                              head_features=kind)).eval()
        arch.load_state_dict(weights)
        out[kind] = arch(arch.encode(emb, batch), target, batch)[0]
        assert out[kind].shape == (5, arch.out_dim)
    assert out["matched"].shape[1] == 2 * c + 2 * c * d and out["paper"].shape[1] == 2 * c * d
    torch.testing.assert_close(out["matched"][:, 2 * c:], out["paper"])
    r = out["paper"][:, : c * d].view(5, c, d)
    real = r.norm(dim=-1) > 0
    torch.testing.assert_close(out["matched"][:, :c][real], r.norm(dim=-1).log()[real])
    want_cos = torch.nn.functional.cosine_similarity(r, target.unsqueeze(1), dim=-1)
    torch.testing.assert_close(out["matched"][:, c:2 * c][real], want_cos[real])
    assert not batch.hist_mask[0].any() and torch.all(out["matched"][0, c:2 * c] == 0)  # empty history


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_diffumin_generated_interests_start_at_their_scale(spec, scale):
    ranker = build_ranker("diffumin", spec, embed_dim=8, long={"generated_scale_init": scale})
    w = ranker.over.norm.weight.detach()
    tail = ranker.long.config.channels * ranker.config.item_dim  # r* is the last c·d head inputs
    assert torch.all(w[-tail:] == scale) and torch.all(w[:-tail] == 1.0)
    no_norm = build_ranker("diffumin", spec, embed_dim=8, over={"input_norm": False})
    assert no_norm.over.scale is not None and torch.all(no_norm.over.scale[-tail:] == 0.0)


# ---- DIN ------------------------------------------------------------------------------------------


def test_din_softmax_is_explicit_and_no_softmax_sums_free_weights():
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(2, 4, generator=g), torch.randn(1, 6, 4, generator=g)
    mask, uidx = torch.ones(1, 6, dtype=torch.bool), torch.zeros(2, dtype=torch.long)
    free = DINAttention(4, DINConfig(hidden=5, activation="prelu", softmax=False)).eval()
    soft = DINAttention(4, DINConfig(hidden=5, activation="prelu", softmax=True)).eval()
    doubled = torch.cat([keys, keys], dim=1)  # every behavior twice
    mask2 = torch.ones(1, 12, dtype=torch.bool)
    # no softmax: the interest magnitude grows with repeated evidence; softmax: it does not
    torch.testing.assert_close(free(q, doubled, mask2, uidx), 2 * free(q, keys, mask, uidx))
    with torch.no_grad():
        soft.fc1.load_state_dict(free.fc1.state_dict())
        soft.fc2.weight.copy_(free.fc2.weight)
    torch.testing.assert_close(soft(q, doubled, mask2, uidx), soft(q, keys, mask, uidx))


def test_dice_uses_batch_statistics_in_training_and_running_in_eval():
    dice = Dice(3, momentum=1.0)
    x = torch.randn(50, 3) * 4 + 2
    y_train = dice.train()(x)
    torch.testing.assert_close(y_train, dice.activate(x, x.mean(0), x.var(0, unbiased=False)))
    torch.testing.assert_close(dice.running_mean, x.mean(0))
    torch.testing.assert_close(dice.running_var, x.var(0, unbiased=True))
    y_eval = dice.eval()(x * 0.5)
    torch.testing.assert_close(y_eval, dice.activate(x * 0.5, dice.running_mean, dice.running_var))
    assert dice.train()(x[:1]).shape == (1, 3)  # one row works (variance 0)


def test_din_mba_l2_touches_only_rows_in_the_batch(spec, make_batch):
    ranker = build_ranker("din", spec, embed_dim=8, mba_l2=1.0)
    train = RankerTrain(ranker)
    batch = make_batch()
    term = train.mba_l2(batch)
    term.backward()
    g = ranker.embedding.item.weight.grad
    present = torch.unique(torch.cat([batch.hist_item[:, :64][batch.hist_mask], batch.cand_item]))
    absent = torch.ones(spec.item_buckets, dtype=torch.bool)
    absent[present] = False
    assert g[present].abs().sum() > 0 and g[absent].abs().sum() == 0
    assert train.item_counts[present].min() >= 1
