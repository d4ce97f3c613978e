"""target_attention (fused DIN activation unit): Triton vs reference, forward and backward.

Weight gradients are reduced from per-row partial buffers (deterministic); ``d keys`` is scattered
with ``atomic_add`` because candidates of one user share keys, so it is compared with the
three-way tolerance of STYLE R3, never bit-exactly (true of every float output here anyway).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.triton_kernels.utils import (
    DEVICE,
    assert_three_way,
    assert_triton_ran,
    jagged_lengths,
    length_mask,
    poison_padding,
)
from triton_kernels import Backend, target_attention
from triton_kernels.reference import target_attention as target_attention_ref

SHAPES = [  # (B, U, L, d, H)
    (1, 1, 1, 16, 16),  # single row, single behavior
    (7, 1, 17, 5, 9),  # serving layout, L just above BLOCK_L=16, odd widths, prime B
    (13, 13, 33, 20, 36),  # training layout, prime B, DIN's hidden width 36
    (3, 2, 40, 12, 3),  # tiny hidden layer, three L tiles
]
BACKENDS = [Backend.TORCH, pytest.param(Backend.TRITON, marks=pytest.mark.interpret)]
ACTS = ["sigmoid", "dice", "prelu", "relu", "identity"]


def _inputs(b, u, length, d, h, gen, dtype=torch.float32):
    lengths = jagged_lengths(u, length, gen)
    t = {
        "query": torch.randn(b, d, generator=gen),
        "keys": torch.randn(u, length, d, generator=gen),
        "w1": torch.randn(4 * d, h, generator=gen) / (2 * d) ** 0.5,
        "b1": torch.randn(h, generator=gen) * 0.1,
        "w2": torch.randn(h, generator=gen) / h**0.5,
        "b2": torch.randn(1, generator=gen) * 0.1,
        "alpha": torch.rand(h, generator=gen),
        "dice_mean": torch.randn(h, generator=gen) * 0.1,
        "dice_var": torch.rand(h, generator=gen) + 0.5,
    }
    t = {k: v.to(DEVICE, dtype) for k, v in t.items()}
    t["mask"] = length_mask(lengths, length).to(DEVICE)
    t["user_index"] = (torch.arange(b) if b == u else torch.randint(0, u, (b,), generator=gen)).to(DEVICE)
    return t


GRAD_NAMES = ("query", "keys", "w1", "b1", "w2", "b2", "alpha")


def _run(backend, t, activation, softmax, upcast=False):
    leaves = {k: t[k].detach().clone().requires_grad_() for k in GRAD_NAMES}
    needs_alpha = activation in ("prelu", "dice")
    out = target_attention(
        leaves["query"], leaves["keys"], t["mask"], t["user_index"], leaves["w1"], leaves["b1"], leaves["w2"],
        leaves["b2"], activation=activation, alpha=leaves["alpha"] if needs_alpha else None,
        dice_mean=t["dice_mean"], dice_var=t["dice_var"], softmax=softmax, upcast=upcast, backend=backend)
    weight = torch.linspace(-1, 2, out.numel(), device=out.device).view_as(out)
    (out.float() * weight).sum().backward()
    return out.detach(), {k: leaves[k].grad for k in GRAD_NAMES if leaves[k].grad is not None}


def _check(t, activation, softmax, dtype):
    got = _run(Backend.TRITON, t, activation, softmax)
    assert_triton_ran("target_attention")
    ref32 = _run(Backend.TORCH, t, activation, softmax, upcast=True)
    low = _run(Backend.TORCH, t, activation, softmax)
    assert_three_way(got[0], ref32[0], low[0], dtype, "out")
    assert got[1].keys() == ref32[1].keys()
    for name in ref32[1]:
        assert_three_way(got[1][name], ref32[1][name], low[1][name], dtype, f"d {name}")


@pytest.mark.interpret
@pytest.mark.parametrize("b,u,length,d,h", SHAPES)
@pytest.mark.parametrize("softmax", [False, True])
def test_target_attention_parity(b, u, length, d, h, softmax, gen) -> None:
    _check(_inputs(b, u, length, d, h, gen), "dice" if softmax else "sigmoid", softmax, torch.float32)


@pytest.mark.interpret
@pytest.mark.parametrize("activation", ACTS)
def test_target_attention_activations(activation, gen) -> None:
    _check(_inputs(5, 3, 19, 6, 10, gen), activation, activation == "relu", torch.float32)  # prime B, odd d


@pytest.mark.interpret
@pytest.mark.parametrize("softmax", [False, True])
def test_target_attention_grouped_users(softmax, gen) -> None:
    """Several users with 0, 1, 2 and > 2 candidates, rows shuffled, jagged lengths: every d-keys path.

    Under the interpreter ``BLOCK_B = 2``: a user with one candidate is written by the row kernel,
    one with two by a single d-keys group (plain store), one with more by several groups
    (``atomic_add``); a user without candidates keeps d keys = 0.
    """
    from triton_kernels._triton.target_attention import INTERPRET_BLOCK_B

    assert INTERPRET_BLOCK_B == 2
    per_user = torch.tensor([3, 1, 0, 2, 5, 1, 4])  # candidates of each of the 7 users
    u = per_user.numel()
    rows = torch.repeat_interleave(torch.arange(u), per_user)
    rows = rows[torch.randperm(rows.numel(), generator=gen)]
    t = _inputs(rows.numel(), u, 37, 6, 10, gen)
    t["user_index"] = rows.to(DEVICE)
    _check(t, "dice" if softmax else "prelu", softmax, torch.float32)
    got = _run(Backend.TRITON, t, "sigmoid", softmax)[1]["keys"]
    assert torch.all(got[2] == 0)  # the user without candidates


def test_user_groups_table() -> None:
    """The device-side grouping covers every candidate of every multi-candidate user exactly once."""
    pytest.importorskip("triton")
    from triton_kernels._triton.target_attention import _user_groups

    users = torch.tensor([4, 0, 4, 2, 4, 0, 5, 4, 4, 1, 0])
    for block_b in (1, 2, 3, 8):
        counts, order, groups = _user_groups(users, 6, block_b)
        assert counts.tolist() == [3, 1, 1, 0, 5, 1]
        assert torch.equal(users[order], users.sort(stable=True).values)
        seen = []
        for user, first, n, atomic in groups.tolist():
            if n == 0:
                continue
            assert 1 <= n <= block_b and atomic == int(counts[user] > block_b)
            seen += [(user, int(order[i])) for i in range(first, first + n)]
            assert all(users[order[i]] == user for i in range(first, first + n))
        expected = [(int(users[i]), i) for i in range(users.numel()) if counts[users[i]] > 1]
        assert sorted(seen) == sorted(expected)


def test_config_env_override(monkeypatch) -> None:
    """``CTRSTREAM_TA_CONFIG`` overrides the launch choices on a GPU; bad values fail at the call."""
    pytest.importorskip("triton")
    from triton_kernels._triton import target_attention as ta

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(ta.CONFIG_ENV, " BLOCK_L=64, num_warps=16 ,BLOCK_B=3,")
    cfg = ta._config(4, 64, 36)
    assert (cfg.block_size, cfg.num_warps, cfg.get("BLOCK_B")) == (64, 16, 3)
    monkeypatch.setenv(ta.CONFIG_ENV, "BLOCK_L_BWD=32,num_warps_bwd=8")
    cfg = ta._config(4, 64, 36)
    assert (cfg.get("BLOCK_L_BWD"), cfg.get("NUM_WARPS_BWD")) == (32, 8)
    for bad in ("BLOCK_L=48", "BLOCK_L=8", "num_warps=3", "BLOCK_B=0", "BLOCK_Q=4", "BLOCK_L", "BLOCK_L=x"):
        monkeypatch.setenv(ta.CONFIG_ENV, bad)
        with pytest.raises(ValueError, match=ta.CONFIG_ENV):
            ta._config(4, 64, 36)
    monkeypatch.setenv(ta.CONFIG_ENV, "")
    cfg = ta._config(4, 64, 36)
    assert (cfg.block_size, cfg.num_warps, cfg.get("BLOCK_B"), cfg.get("BLOCK_L_BWD")) == (32, 8, 8, 16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(ta.CONFIG_ENV, "BLOCK_L=64")
    assert ta._config(4, 8, 8).block_size == ta.INTERPRET_BLOCK_L  # ignored under the interpreter


def test_reference_matches_concat_definition(gen) -> None:
    """The decomposed first layer equals the literal ``act([q, k, q−k, q⊙k] @ w1 + b1)`` of DIN."""
    t = _inputs(4, 4, 6, 5, 7, gen)
    q, k = t["query"], t["keys"]
    for softmax in (False, True):
        got = target_attention_ref(q, k, t["mask"], t["user_index"], t["w1"], t["b1"], t["w2"], t["b2"],
                                   activation="prelu", alpha=t["alpha"], softmax=softmax)
        qe = q.unsqueeze(1).expand_as(k)
        x = torch.cat([qe, k, qe - k, qe * k], dim=-1) @ t["w1"] + t["b1"]
        hidden = torch.nn.functional.prelu(x.reshape(-1, x.shape[-1]), t["alpha"]).view_as(x)
        score = hidden @ t["w2"] + t["b2"]
        if softmax:
            score = score.masked_fill(~t["mask"], float("-inf")).softmax(-1).nan_to_num(0.0)
        else:
            score = score * t["mask"]
        torch.testing.assert_close(got, (score.unsqueeze(-1) * k).sum(1))


def test_reference_dice_matches_batchnorm_eval(gen) -> None:
    """Our eval-form Dice equals FuxiCTR's Dice (BatchNorm1d(affine=False) in eval) elementwise."""
    h = 6
    bn = torch.nn.BatchNorm1d(h, affine=False, eps=1e-9)
    bn.running_mean.copy_(torch.randn(h, generator=gen))
    bn.running_var.copy_(torch.rand(h, generator=gen) + 0.3)
    bn.eval()
    alpha, x = torch.rand(h, generator=gen), torch.randn(10, h, generator=gen)
    p = torch.sigmoid(bn(x))
    expected = p * x + alpha * (1 - p) * x
    from triton_kernels.reference.target_attention import apply_activation

    got = apply_activation(x, "dice", alpha, bn.running_mean, bn.running_var, 1e-9)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softmax", [False, True])
def test_padding_never_leaks(backend, softmax, gen) -> None:
    t = _inputs(5, 3, 20, 6, 8, gen)
    clean = _run(backend, t, "sigmoid", softmax)
    dirty = _run(backend, dict(t, keys=poison_padding(t["keys"], t["mask"])), "sigmoid", softmax)
    torch.testing.assert_close(dirty[0], clean[0])
    for name in clean[1]:
        torch.testing.assert_close(dirty[1][name], clean[1][name], msg=name)
    assert torch.all(dirty[1]["keys"][~t["mask"]] == 0)
    assert torch.all(dirty[0][t["user_index"] == 0] == 0)  # user 0 has no behaviors


def test_missing_activation_params_raise(gen) -> None:
    t = _inputs(2, 2, 3, 4, 4, gen)
    with pytest.raises(ValueError, match="alpha"):
        target_attention(t["query"], t["keys"], t["mask"], t["user_index"], t["w1"], t["b1"], t["w2"],
                         t["b2"], activation="dice", backend=Backend.TORCH)


@pytest.mark.interpret
@settings(deadline=None, max_examples=6)
@given(b=st.integers(1, 5), u=st.integers(1, 3), length=st.integers(1, 40), d=st.integers(1, 20),
       h=st.integers(1, 40), activation=st.sampled_from(ACTS), softmax=st.booleans(),
       seed=st.integers(0, 2**16))
def test_target_attention_property(b, u, length, d, h, activation, softmax, seed) -> None:
    t = _inputs(b, u, length, d, h, torch.Generator().manual_seed(seed))
    _check(t, activation, softmax, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("b,u,length", [(1024, 1, 10_007), (256, 256, 1024)])  # serving / training
def test_target_attention_gpu(dtype, b, u, length) -> None:
    gen = torch.Generator().manual_seed(13)
    _check(_inputs(b, u, length, 64, 36, gen, dtype), "dice", True, dtype)
