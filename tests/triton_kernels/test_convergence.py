"""Convergence (STYLE R10, issue 5): a tiny ranker built only from the kernel ops trains the same
under Backend.TORCH and Backend.TRITON (interpreted on CPU, compiled on GPU).

The ranker: item embeddings → SDIM long-term interest (hash, bucket sums, gather) + DARE top-K
search (separate attention/representation tables, learned position logits) + DIN target
attention (eval-form Dice) → linear head. Both runs start from the same weights and see the same
fixed batch stream; the loss trajectories and final weights must agree within fp32 tolerance.
A hash bit or top-K choice flipping between backends would show up as a jump here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.triton_kernels.utils import DEVICE, jagged_lengths, length_mask
from triton_kernels import Backend, dare_search, sdim_bucket_sums, sdim_gather, sdim_hash, target_attention
from triton_kernels.backend import resolution_counts

# One L tile (L = 12 < BLOCK_L = 16) keeps the interpreter fast; the parity tests cover tiling.
VOCAB, DIM, LENGTH, HIDDEN, GROUPS, BITS, TOP_K = 30, 8, 12, 12, 2, 2, 4


class TinyRanker(nn.Module):
    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
        self.emb = nn.Embedding(VOCAB, DIM)  # SDIM + DIN item embedding
        self.att = nn.Embedding(VOCAB, DIM)  # DARE attention table
        self.rep = nn.Embedding(VOCAB, DIM)  # DARE representation table
        self.pos = nn.Parameter(torch.zeros(LENGTH))
        self.register_buffer("proj", torch.randn(DIM, GROUPS * BITS))
        self.w1 = nn.Parameter(torch.randn(4 * DIM, HIDDEN) * 0.2)
        self.b1 = nn.Parameter(torch.zeros(HIDDEN))
        self.w2 = nn.Parameter(torch.randn(HIDDEN) * 0.2)
        self.b2 = nn.Parameter(torch.zeros(1))
        self.alpha = nn.Parameter(torch.full((HIDDEN,), 0.25))
        self.register_buffer("dice_mean", torch.zeros(HIDDEN))
        self.register_buffer("dice_var", torch.ones(HIDDEN))
        self.head = nn.Linear(4 * DIM, 1)

    def forward(self, hist, mask, cand, users):  # (U, L), (U, L), (B,), (B,) -> (B,)
        seq, q = self.emb(hist), self.emb(cand)  # (U, L, d), (B, d)
        codes = sdim_hash(seq.detach(), self.proj, num_hashes=GROUPS, hash_bits=BITS, backend=self.backend)
        cand_codes = sdim_hash(q.detach().unsqueeze(1), self.proj, num_hashes=GROUPS, hash_bits=BITS,
                               backend=self.backend)[:, 0]
        sums, counts = sdim_bucket_sums(seq, codes, mask, hash_bits=BITS, backend=self.backend)
        long_term = sdim_gather(sums, counts, cand_codes, users, backend=self.backend)  # (B, d)
        searched, _, _ = dare_search(self.att(cand), self.att(hist), self.rep(hist), mask, users, self.pos,
                                     top_k=TOP_K, backend=self.backend)  # (B, d)
        din = target_attention(q, seq, mask, users, self.w1, self.b1, self.w2, self.b2, activation="dice",
                               alpha=self.alpha, dice_mean=self.dice_mean, dice_var=self.dice_var,
                               backend=self.backend)  # (B, d)
        return self.head(torch.cat([q, long_term, searched * self.rep(cand), din], dim=-1)).squeeze(-1)


def _stream(steps: int, batch: int):
    gen = torch.Generator().manual_seed(99)
    for _ in range(steps):
        hist = torch.randint(0, VOCAB, (batch, LENGTH), generator=gen)
        mask = length_mask(jagged_lengths(batch, LENGTH, gen), LENGTH)
        cand = torch.randint(0, VOCAB, (batch,), generator=gen)
        repeat = torch.rand(batch, generator=gen) < 0.5  # half the candidates re-show the newest behavior
        cand = torch.where(repeat, hist[:, 0], cand)
        label = ((hist == cand.unsqueeze(1)) & mask).any(1).float()  # clicked ⇔ seen in the history
        yield (t.to(DEVICE) for t in (hist, mask, cand, label))


def _train(backend: Backend, steps: int = 30, batch: int = 4):
    torch.manual_seed(0)
    model = TinyRanker(backend).to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)  # Adam would amplify 1e-9 grad noise
    losses = []
    for hist, mask, cand, label in _stream(steps, batch):
        users = torch.arange(batch, device=DEVICE)  # training layout: U == B
        loss = nn.functional.binary_cross_entropy_with_logits(model(hist, mask, cand, users), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses), {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.interpret
@pytest.mark.convergence
def test_tiny_ranker_converges_identically() -> None:
    ref_losses, ref_state = _train(Backend.TORCH)
    got_losses, got_state = _train(Backend.TRITON)
    ran = {op for (op, b), n in resolution_counts().items() if b is Backend.TRITON and n}
    assert ran == {"sdim_hash", "sdim_bucket_sums", "sdim_gather", "dare_search", "target_attention"}
    assert ref_losses[-5:].mean() < ref_losses[:5].mean()  # it does learn
    torch.testing.assert_close(got_losses, ref_losses, rtol=1e-4, atol=5e-5)
    for name, ref in ref_state.items():
        torch.testing.assert_close(got_state[name], ref, rtol=1e-4, atol=5e-5, msg=name)
