"""Target attention: the DIN activation unit (short window, or the whole sequence for ``din_long``)
and DiffuMIN's orthogonal multi-interest extraction with diffusion augmentation.

Shapes follow :mod:`models.features`: ``U`` history rows, ``L`` columns (most recent first,
padding at the end, ``mask`` True on real behaviors), ``B`` candidate rows, ``user_index (B,)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from models.arch.layers import Dice, make_activation
from models.base import BackendModule
from models.config import DiffuMINConfig, DINConfig
from models.features import Batch
from triton_kernels import target_attention

if TYPE_CHECKING:
    from triton_kernels.reference.target_attention import Activation

__all__ = ["DINAttention", "DINLongArch", "DiffuMINArch", "DiffusionDenoiser"]

#: Dice statistics of the activation unit are estimated on at most this many evenly strided
#: history columns (all rows): exact for the short window (50), and for a 10,000-long sequence it
#: keeps the extra statistics pass at a few percent of the attention itself.
DICE_STAT_COLUMNS = 256


class DINAttention(BackendModule):
    """DIN local activation unit + weighted sum pooling (papers.md §1(a)), via the fused
    ``triton_kernels.target_attention`` op.

    For candidate ``q`` and behavior ``k`` the unit scores ``[q, k, q−k, q⊙k] → FC(H) → act →
    FC(1)``; the output is ``Σ_l w_l·k_l`` over real behaviors. ``config.softmax`` chooses the
    paper's un-normalised weights (False) or the DIN code's softmax (True), explicitly
    (pitfall 24). With ``activation="dice"`` the hidden units use Dice: batch statistics over the
    flattened real (candidate, behavior) rows in training, running statistics in eval
    (pitfall 25). The batch statistics enter the fused op as constants (no gradient through the
    mean/variance: the op takes them as inputs), a documented simplification of BatchNorm's
    backward.

    Args:
        dim (int): behavior/candidate embedding width d.
        config (DINConfig): hidden width, activation, softmax (``length`` is used by the caller).

    Example:
        >>> att = DINAttention(8, DINConfig(hidden=4)).eval()
        >>> out = att(torch.randn(3, 8), torch.randn(1, 5, 8), torch.ones(1, 5, dtype=torch.bool),
        ...           torch.zeros(3, dtype=torch.long))
        >>> assert out.shape == (3, 8)
    """

    def __init__(self, dim: int, config: DINConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = dim
        self.fc1 = nn.Linear(4 * dim, config.hidden)
        self.act = make_activation(config.activation, config.hidden)
        # under softmax a score bias cancels out (zero gradient forever), so it is left out
        self.fc2 = nn.Linear(config.hidden, 1, bias=not config.softmax)

    def _dice_statistics(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                         user_index: torch.Tensor, w1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dice = self.act
        assert isinstance(dice, Dice)
        if not self.training:
            return dice.running_mean, dice.running_var
        with torch.no_grad():
            length = keys.shape[1]
            step = max(1, -(-length // DICE_STAT_COLUMNS))
            k = keys[:, ::step]  # (U, L', d)
            m = mask[:, ::step]  # (U, L')
            k = torch.where(m.unsqueeze(-1), k, torch.zeros((), dtype=k.dtype, device=k.device))
            wq, wk, wd, wp = torch.split(w1, self.dim, dim=0)  # each (d, H)
            hq = query @ (wq + wd) + self.fc1.bias  # (B, H)
            k_b = k.index_select(0, user_index)  # (B, L', d)
            hidden = hq.unsqueeze(1) + k_b @ (wk - wd) + (query.unsqueeze(1) * k_b) @ wp  # (B, L', H)
            return dice.statistics(hidden, m.index_select(0, user_index), differentiable=False)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor,
                user_index: torch.Tensor) -> torch.Tensor:
        """query (B, d), keys (U, L, d), mask (U, L) bool, user_index (B,) → (B, d)."""
        w1 = self.fc1.weight.t().contiguous()  # (4d, H)
        alpha = mean = var = None
        eps = 1e-8
        if isinstance(self.act, Dice):
            alpha, eps = self.act.alpha, self.act.eps
            mean, var = self._dice_statistics(query, keys, mask, user_index, w1)
        elif isinstance(self.act, nn.PReLU):
            alpha = self.act.weight
        b2 = self.fc2.bias if self.fc2.bias is not None else query.new_zeros(1)
        return target_attention(
            query, keys, mask, user_index, w1, self.fc1.bias, self.fc2.weight.view(-1), b2,
            activation=cast("Activation", self.config.activation), alpha=alpha, dice_mean=mean, dice_var=var,
            dice_eps=eps, softmax=self.config.softmax, backend=self.backend,
        )  # (B, d)


class DINLongArch(BackendModule):
    """``din_long``'s long-sequence module: DIN target attention over the whole sequence (or its
    first ``config.length`` columns): the quality and cost ceiling the sampled/searched modules
    are compared with (SDIM paper's "DIN (Long Seq.)").

    Args:
        dim (int): behavior/candidate embedding width d.
        config (DINConfig): the activation unit; ``length`` 0 = every column.

    Example:
        >>> from models.features import build_batch, FeatureSpec
        >>> arch = DINLongArch(8, DINConfig(length=0, hidden=4, softmax=True)).eval()
        >>> enc = {"long_emb": torch.randn(1, 6, 8), "long_mask": torch.ones(1, 6, dtype=torch.bool)}
        >>> batch = Batch(*(torch.zeros(1, 6, dtype=torch.long),) * 3, enc["long_mask"],
        ...               torch.ones(4, dtype=torch.long), torch.ones(4, dtype=torch.long),
        ...               torch.zeros(4, dtype=torch.long))
        >>> out, aux = arch(enc, torch.randn(4, 8), batch)
        >>> assert out.shape == (4, 8) and aux == {}
    """

    def __init__(self, dim: int, config: DINConfig) -> None:
        super().__init__()
        self.attention = DINAttention(dim, config)
        self.out_dim = dim

    def encode(self, hist_emb: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """The embedded window and its mask, (U, L, d) and (U, L)."""
        n = self.attention.config.length or hist_emb.shape[1]
        return {"long_emb": hist_emb[:, :n], "long_mask": batch.hist_mask[:, :n]}

    def forward(self, encoded: dict[str, torch.Tensor], target: torch.Tensor, batch: Batch,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.attention(target, encoded["long_emb"], encoded["long_mask"], batch.user_index)
        return out, {}


def _sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer/DDPM sinusoidal embedding of integer steps ``t (N,)`` → ``(N, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    ang = t.to(torch.float32).unsqueeze(-1) * freqs  # (N, half)
    emb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1]))


class DiffusionDenoiser(nn.Module):
    """DiffuMIN's DMIG denoiser (papers.md §4(a), the official code's block structure).

    Input: ``c`` interest tokens (one noised, the others the clean "contextual" interests), a
    step ``t`` and the channel's basis vector ``o``. A sinusoidal step embedding →
    Linear(4d)·swish → Linear(d) is added to every token; then ``layers`` post-LayerNorm blocks of
    self-attention over the tokens, cross-attention to ``o`` and an FFN (``ffn_factor·d``, ReLU).
    The output token at the noised position is the prediction of the **clean** interest
    (x0-parameterisation, used by both the loss and the sampler: pitfall 19).

    Args:
        dim (int): interest width d.
        config (DiffuMINConfig): ``layers``, ``heads``, ``ffn_factor``.

    Example:
        >>> den = DiffusionDenoiser(8, DiffuMINConfig(channels=2, heads=2))
        >>> x0 = den(torch.randn(3, 2, 8), torch.tensor([1, 5, 9]), torch.randn(3, 8), torch.tensor([0, 1, 0]))
        >>> assert x0.shape == (3, 8)
    """

    def __init__(self, dim: int, config: DiffuMINConfig) -> None:
        super().__init__()
        self.dim = dim
        self.time = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        self.self_attn = nn.ModuleList(nn.MultiheadAttention(dim, config.heads, bias=False, batch_first=True)
                                       for _ in range(config.layers))
        # cross-attention to the ONE basis vector o: softmax over a single key is 1, so it is
        # exactly out_proj(value_proj(o)) for every token (the query/key projections cancel)
        self.cross_value = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(config.layers))
        self.cross_out = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in range(config.layers))
        self.ffn = nn.ModuleList(nn.Sequential(nn.Linear(dim, config.ffn_factor * dim), nn.ReLU(),
                                               nn.Linear(config.ffn_factor * dim, dim))
                                 for _ in range(config.layers))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3 * config.layers))

    def forward(self, tokens: torch.Tensor, t: torch.Tensor, basis: torch.Tensor,
                position: torch.Tensor) -> torch.Tensor:
        """tokens (N, c, d), t (N,), basis (N, d), position (N,) of the noised token → (N, d)."""
        x: torch.Tensor = tokens + self.time(_sinusoidal(t, self.dim)).unsqueeze(1)  # (N, c, d)
        for j, (sa, ffn) in enumerate(zip(self.self_attn, self.ffn, strict=True)):
            x = self.norms[3 * j](x + sa(x, x, x, need_weights=False)[0])
            cross = self.cross_out[j](self.cross_value[j](basis)).unsqueeze(1)  # (N, 1, d)
            x = self.norms[3 * j + 1](x + cross)
            x = self.norms[3 * j + 2](x + ffn(x))
        return x[torch.arange(x.shape[0], device=x.device), position]  # (N, d)


#: A Gram-Schmidt residual shorter than this is treated as rank deficiency (zero basis vector).
_QR_EPS = 1e-6


def _projector(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))


class DiffuMINArch(BackendModule):
    """DiffuMIN (papers.md §4): OMIE → DMIG → CMIC over the long sequence.

    **OMIE.** The target is projected to ``c`` vectors (``W: d → c·d``) and orthonormalised by a
    batched thin QR whose signs are fixed (``diag(R) > 0``, pitfall 18), giving channel bases
    ``O (B, d, c)``. Relevance ``A = E·O`` (B, L, c); each real behavior is routed to its top-1
    channel, each channel keeps its ``keep`` most relevant routed behaviors (the official code's
    fixed top-k rather than the paper's top-p%, pitfall 23), and the interest is the
    relevance-weighted sum over the kept behaviors divided by the sequence length, as in the code
    (``r (B, c, d)``). The code divides by the *padded* length; we divide by the user's real
    length (the same on unpadded data), so padding never changes the output and ``r`` still
    grows with how much of the history the channel keeps.

    **DMIG.** ``r̂ = ℓ2norm(r)`` is diffused with a linear-β DDPM schedule. The denoiser predicts
    x0 (the clean interest) in the loss ``L_d = MSE(f(x_t, t), r̂)`` *and* in the sampler (one
    parameterisation, pitfall 19). The sampler starts from a perturbed genuine interest
    ``q(x_{t0} | r̂)`` at ``t0 = start_step`` and takes ``sample_steps`` strided DDPM posterior
    steps to t = 0: in training with fresh noise and gradients through every step, in inference
    without noise (the mean of every step), so serving scores are deterministic and independent
    of the batch.

    **CMIC.** Per channel, ``r̂`` and ``r*`` go through two projectors (d → 4d ReLU → d),
    are ℓ2-normalised and aligned by InfoNCE over the batch (temperature 0.05).

    **Head features.** The paper feeds ``[r, r*]`` (``head_features="paper"``, B × 2·c·d). The
    default ``"matched"`` puts two scalars per channel in front, ``[log‖r_c‖, cos(r_c, e_s), r,
    r*]`` (B × (2·c + 2·c·d)), a deviation measured in docs/models.md: ``r`` is a relevance-weighted
    sum of small embeddings divided by L, so its variance is ~1e-10 against the head BatchNorm's
    eps of 1e-5 and the head barely saw it; the log-norm is scale-free (the embedding scale and
    1/L become an additive constant that BatchNorm removes), and the cosine with the target gives
    the head the target-match signal an MLP cannot easily form from ``r`` and ``e_s``. The head's
    input scale of ``r*`` starts at ``config.generated_scale_init`` (default 0; 1 is the paper's
    plain concat), so the head starts from OMIE and learns how much of the generated interests
    to use. Losses (training, wired in): ``λ1·L_d + λ2·L_cl`` as ``diffumin_diffusion`` and
    ``diffumin_contrastive``; they train the generator from the first step whatever that scale.

    Args:
        dim (int): behavior/candidate embedding width d (>= channels).
        config (DiffuMINConfig): channels, keep, denoiser shape, schedule, loss weights.

    Example:
        >>> arch = DiffuMINArch(8, DiffuMINConfig(channels=2, keep=3, sample_steps=2)).eval()
        >>> mask = torch.ones(1, 6, dtype=torch.bool)
        >>> batch = Batch(*(torch.zeros(1, 6, dtype=torch.long),) * 3, mask,
        ...               torch.ones(4, dtype=torch.long), torch.ones(4, dtype=torch.long),
        ...               torch.zeros(4, dtype=torch.long))
        >>> out, aux = arch(arch.encode(torch.randn(1, 6, 8), batch), torch.randn(4, 8), batch)
        >>> assert out.shape == (4, 2 * 2 + 2 * 2 * 8)  # [log|r_c|, cos(r_c, e_s), r, r*]
    """

    alphas_cumprod: torch.Tensor  # (T,) buffers, registered in __init__
    sample_timesteps: torch.Tensor

    def __init__(self, dim: int, config: DiffuMINConfig) -> None:
        super().__init__()
        self.config = config
        self.dim = dim
        self.project = nn.Linear(dim, config.channels * dim, bias=False)
        self.denoiser = DiffusionDenoiser(dim, config)
        self.cl_interest = _projector(dim)
        self.cl_generated = _projector(dim)
        betas = torch.linspace(config.beta_start, config.beta_end, config.diffusion_steps, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float(), persistent=False)  # (T,)
        steps = torch.linspace(config.start_step, 0, config.sample_steps).round().to(torch.int64)
        self.register_buffer("sample_timesteps", torch.unique_consecutive(steps), persistent=False)
        self.matched = config.head_features == "matched"
        self.out_dim = 2 * config.channels * dim + (2 * config.channels if self.matched else 0)
        # r* is the last c·d head inputs; the head starts them at this scale (see OverArch)
        self.head_tail_scale = (config.channels * dim, config.generated_scale_init)

    def encode(self, hist_emb: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """The embedded sequence and its mask (OMIE depends on the candidate, so no more)."""
        return {"long_emb": hist_emb, "long_mask": batch.hist_mask}

    def channels(self, target: torch.Tensor) -> torch.Tensor:
        """Orthonormal channel bases ``(B, d, c)`` of the targets ``(B, d)``, signs fixed.

        The thin QR with ``diag(R) > 0`` (the unique QR of a full-rank matrix), computed by
        Gram-Schmidt over the ``c`` columns in fp32 (re-orthogonalised once, "twice is enough"):
        c is tiny, so this is a few elementwise ops with a cheap backward, where the batched
        ``linalg.qr`` backward dominated a training step on CPU. A column that is (numerically)
        in the span of the previous ones gets a zero basis vector instead of NaN.
        """
        b = target.shape[0]
        x = self.project(target).view(b, self.config.channels, self.dim).float()  # (B, c, d) rows = columns of X
        basis: list[torch.Tensor] = []
        for j in range(self.config.channels):
            v = x[:, j]  # (B, d)
            for _ in range(2):
                for q in basis:
                    v = v - (q * v).sum(-1, keepdim=True) * q
            norm = v.norm(dim=-1, keepdim=True)
            basis.append(v / norm.clamp(min=_QR_EPS) * (norm > _QR_EPS))
        return torch.stack(basis, dim=-1).to(target.dtype)  # (B, d, c)

    def interests(self, bases: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor,
                  user_index: torch.Tensor) -> torch.Tensor:
        """OMIE: bases (B, d, c), emb (U, L, d), mask (U, L) → interests r (B, c, d).

        Relevance is laid out (B, c, L) so the routing, the per-channel top-k and the gather all
        run along contiguous L; top-1 routing keeps the first channel on ties (as ``argmax``).
        """
        c = self.config.channels
        bt = bases.transpose(1, 2)  # (B, c, d)
        if emb.shape[0] == 1:  # one user (serving): one (B·c, d) x (d, L) GEMM
            rel = (bt.reshape(-1, bt.shape[-1]) @ emb[0].T).view(bt.shape[0], c, -1)  # (B, c, L)
        else:
            rel = torch.bmm(bt, emb.index_select(0, user_index).transpose(1, 2))  # (B, c, L)
        real = mask.index_select(0, user_index)  # (B, L)
        with torch.no_grad():
            # top-1 channel of every behavior; max over dim 1 returns the first index on ties (as
            # argmax), and on this layout is ~10x faster than argmax
            route = rel.max(1).indices.masked_fill_(~real, -1)  # (B, L); padding routed nowhere
            channel = torch.arange(c, device=rel.device).view(1, c, 1)
            score = rel.masked_fill(route.unsqueeze(1) != channel, float("-inf"))  # (B, c, L)
            k = min(self.config.keep, rel.shape[-1])
            top_val, top_idx = score.topk(k, dim=-1)  # (B, c, k)
        kept = torch.isfinite(top_val)  # (B, c, k)
        w = torch.gather(rel, 2, top_idx) * kept  # (B, c, k) relevance weights (gradient flows here)
        e = emb[user_index.view(-1, 1, 1), top_idx]  # (B, c, k, d)
        n = real.sum(-1).clamp(min=1).to(e.dtype).view(-1, 1, 1)  # (B, 1, 1) the user's real length
        return torch.einsum("bck,bckd->bcd", w, e) / n  # (B, c, d)

    def _tokens(self, x0: torch.Tensor, noised: torch.Tensor) -> torch.Tensor:
        """(B, c, d) clean and noised → (B·c, c, d): row (b, i) is x0[b] with token i noised."""
        b, c, d = x0.shape
        eye = torch.eye(c, dtype=torch.bool, device=x0.device).view(1, c, c, 1)
        return torch.where(eye, noised.unsqueeze(2), x0.unsqueeze(1)).reshape(b * c, c, d)

    def _denoise(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
        b, c, d = x0.shape
        position = torch.arange(c, device=x0.device).repeat(b)  # (B·c,)
        basis = bases.transpose(1, 2).reshape(b * c, d)  # (B·c, d): o_i of each row
        x0_hat: torch.Tensor = self.denoiser(self._tokens(x0, x_t), t.reshape(-1), basis, position)
        return x0_hat.view(b, c, d)

    def diffusion_loss(self, x0: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
        """x0-prediction MSE at a uniform random step per (row, channel)."""
        b, c, _ = x0.shape
        t = torch.randint(0, self.config.diffusion_steps, (b, c), device=x0.device)
        ab = self.alphas_cumprod[t].unsqueeze(-1)  # (B, c, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn_like(x0)
        return F.mse_loss(self._denoise(x0, x_t, t, bases), x0)

    def sample(self, x0: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
        """r* from the perturbed genuine interests ``x0 (B, c, d)``.

        Training draws fresh noise at every step (the paper's stochastic generator, gradients
        through all steps). Eval runs the same reverse process without noise: the start is the
        mean of ``q(x_t0 | r̂)`` and every step takes the posterior mean, so a candidate's score is
        deterministic and independent of its batch (see docs/models.md for why not frozen noise).
        """
        b, c, d = x0.shape
        steps = self.sample_timesteps
        stochastic = self.training

        def noise() -> torch.Tensor | float:
            return torch.randn_like(x0) if stochastic else 0.0

        ab0 = self.alphas_cumprod[steps[0]]
        x = ab0.sqrt() * x0 + (1 - ab0).sqrt() * noise()
        for j in range(steps.shape[0]):
            t = steps[j]
            x0_hat = self._denoise(x0, x, t.expand(b, c), bases)
            if j + 1 == steps.shape[0]:
                return x0_hat
            ab_t, ab_s = self.alphas_cumprod[t], self.alphas_cumprod[steps[j + 1]]
            beta = 1 - ab_t / ab_s  # the strided step's beta
            mean = (ab_s.sqrt() * beta * x0_hat + (1 - beta).sqrt() * (1 - ab_s) * x) / (1 - ab_t)
            x = mean + (beta * (1 - ab_s) / (1 - ab_t)).sqrt() * noise()
        return x

    def contrastive_loss(self, x0: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """CMIC InfoNCE per channel across the batch rows, averaged over channels."""
        b = x0.shape[0]
        if b < 2:
            return x0.sum() * 0.0
        z1 = F.normalize(self.cl_interest(x0), dim=-1).transpose(0, 1)  # (c, B, d)
        z2 = F.normalize(self.cl_generated(generated), dim=-1).transpose(0, 1)  # (c, B, d)
        sim = z1 @ z2.transpose(1, 2) / self.config.temperature  # (c, B, B)
        target = torch.arange(b, device=x0.device).expand(sim.shape[0], b)
        return F.cross_entropy(sim.reshape(-1, b), target.reshape(-1))

    def forward(self, encoded: dict[str, torch.Tensor], target: torch.Tensor, batch: Batch,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        bases = self.channels(target)  # (B, d, c)
        r = self.interests(bases, encoded["long_emb"], encoded["long_mask"], batch.user_index)  # (B, c, d)
        x0 = F.normalize(r, dim=-1)  # (B, c, d); an empty channel stays 0
        generated = self.sample(x0, bases)  # (B, c, d)
        aux: dict[str, torch.Tensor] = {}
        if labels is not None and self.training:
            cfg = self.config
            aux["diffumin_diffusion"] = cfg.lambda_diffusion * self.diffusion_loss(x0, bases)
            aux["diffumin_contrastive"] = cfg.lambda_contrastive * self.contrastive_loss(x0, generated)
        b = target.shape[0]
        parts = [r.reshape(b, -1), generated.reshape(b, -1)]
        if self.matched:
            log_norm = 0.5 * torch.log(r.float().pow(2).sum(-1) + 1e-16).to(r.dtype)  # (B, c); empty → -18.4
            cosine = (x0 * F.normalize(target, dim=-1).unsqueeze(1)).sum(-1)  # (B, c); empty → 0
            parts = [log_norm, cosine, *parts]
        return torch.cat(parts, dim=-1), aux
