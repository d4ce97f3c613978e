"""Frozen, validated configs for every ranker part (STYLE R9, R11).

A :class:`RankerConfig` fully rebuilds a :class:`models.ranker.Ranker`: it names the preset, holds
the :class:`~models.features.FeatureSpec` the model was trained with, and one config per named part
(short-sequence target attention, long-sequence module, MLP head). ``to_dict``/``from_dict`` are
JSON-safe and lossless, which is how checkpoints store it (``config.json`` beside the weights).

The long-sequence module is one of four kinds, chosen by the type of ``RankerConfig.long``:
:class:`DINConfig` (full target attention over the whole sequence: ``din_long``),
:class:`SDIMConfig`, :class:`DAREConfig` or :class:`DiffuMINConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from models.features import FeatureSpec

__all__ = [
    "DAREConfig",
    "DINConfig",
    "DiffuMINConfig",
    "LongConfig",
    "OverConfig",
    "RankerConfig",
    "SDIMConfig",
]

_ACTIVATIONS = ("dice", "prelu", "sigmoid", "relu")


@dataclass(frozen=True)
class DINConfig:
    """DIN local activation unit + weighted pooling (papers.md §1(a), pitfalls 24–25)."""

    length: int = 50  # most recent behaviors attended (first `length` columns); 0 = the whole sequence
    hidden: int = 36  # activation-unit hidden width (the paper figure's 36, as DARE's DIN baseline)
    activation: str = "dice"  # hidden activation: dice (paper), prelu, sigmoid (DIN code), relu
    softmax: bool = False  # False = the paper's un-normalised weights; True = DIN code / FuxiCTR option

    def __post_init__(self) -> None:
        if self.length < 0:
            raise ValueError(f"length must be >= 0 (0 = whole sequence), got {self.length}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")


@dataclass(frozen=True)
class SDIMConfig:
    """SDIM hashing (papers.md §2(a), §5 pitfalls 5–11); defaults = the paper's online m=48, τ=3."""

    num_hashes: int = 16  # G = m/τ signature groups (FuxiCTR `num_hashes`)
    hash_bits: int = 3  # τ bits per group, 2**τ buckets each (FuxiCTR `hash_bits`; paper best 3)
    seed: int = 20220517  # seed of the fixed random projection (a buffer, saved with the model)

    def __post_init__(self) -> None:
        if self.num_hashes < 1:
            raise ValueError(f"num_hashes must be >= 1, got {self.num_hashes}")
        if not 1 <= self.hash_bits <= 12:
            raise ValueError(f"hash_bits must be in [1, 12] (2**τ buckets per group), got {self.hash_bits}")


@dataclass(frozen=True)
class DAREConfig:
    """DARE decoupled search (papers.md §3(a), §5 pitfalls 13–17); defaults follow thuml/DARE."""

    attn_dim: int = 8  # attention-table width per field (item, category): search keys are 2*attn_dim
    attn_pos_dim: int = 8  # attention-role relative-position embedding width
    pos_dim: int = 16  # representation-role relative-position embedding width (concatenated)
    top_k: int = 20  # behaviors kept by the hard top-K search (DARE scripts: 20)
    aux_weight: float = 1.0  # weight of the auxiliary full-attention CTR loss (code: 1.0); 0 disables
    exact_positions: int = 256  # relative positions 1..this get their own id; beyond: log-spaced buckets

    def __post_init__(self) -> None:
        for name in ("attn_dim", "attn_pos_dim", "pos_dim", "top_k", "exact_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight}")


@dataclass(frozen=True)
class DiffuMINConfig:
    """DiffuMIN OMIE + DMIG + CMIC (papers.md §4(a), §5 pitfalls 18–23); defaults = the code's."""

    channels: int = 4  # c interest channels (needs c <= behavior width d for the thin QR)
    keep: int = 100  # behaviors kept per channel after top-1 routing (the code's fixed top-100)
    layers: int = 2  # denoiser blocks
    heads: int = 2  # attention heads in the denoiser (must divide d)
    ffn_factor: int = 3  # denoiser FFN width = ffn_factor * d
    diffusion_steps: int = 1000  # T of the linear beta schedule
    beta_start: float = 1e-4  # first beta
    beta_end: float = 0.02  # last beta
    sample_steps: int = 10  # T' reverse steps of the sampler (training and inference)
    start_step: int = 200  # the sampler starts from q(x_t | r) at this t (a perturbed genuine interest)
    temperature: float = 0.05  # CMIC InfoNCE temperature
    lambda_diffusion: float = 0.01  # λ1 on the diffusion (x0-prediction MSE) loss
    lambda_contrastive: float = 0.001  # λ2 on the contrastive calibration loss
    # head features: "matched" = [log|r_c|, cos(r_c, target), r, r*] (ours, docs/models.md) or
    # "paper" = [r, r*] (the paper's concat)
    head_features: str = "matched"
    # initial head-input scale of the generated interests r* (1.0 = the paper's plain concat; 0
    # starts the head without r* and lets it learn how much to use: see docs/models.md)
    generated_scale_init: float = 0.0

    def __post_init__(self) -> None:
        for name in ("channels", "keep", "layers", "heads", "ffn_factor", "diffusion_steps", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError("need 0 < beta_start < beta_end < 1")
        if not self.sample_steps - 1 <= self.start_step < self.diffusion_steps:
            raise ValueError("start_step must be in [sample_steps - 1, diffusion_steps)")
        if self.head_features not in ("matched", "paper"):
            raise ValueError(f"head_features must be 'matched' or 'paper', got {self.head_features!r}")
        if self.temperature <= 0 or self.lambda_diffusion < 0 or self.lambda_contrastive < 0:
            raise ValueError("temperature must be > 0 and the loss weights >= 0")


@dataclass(frozen=True)
class OverConfig:
    """MLP head on the concatenated features (DIN paper: 200 x 80, Dice)."""

    hidden: tuple[int, ...] = (200, 80)  # hidden widths; the last layer is Linear(hidden[-1], 1)
    activation: str = "dice"  # dice (DIN paper), prelu (DARE code), sigmoid, relu
    input_norm: bool = True  # BatchNorm on the head input (DIN, DARE and DiffuMIN codes all have it)

    def __post_init__(self) -> None:
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be >= 1, got {self.hidden}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {self.activation!r}")


LongConfig = DINConfig | SDIMConfig | DAREConfig | DiffuMINConfig
_LONG_KINDS: dict[str, type] = {"din": DINConfig, "sdim": SDIMConfig, "dare": DAREConfig,
                                "diffumin": DiffuMINConfig}


def _long_kind(cfg: LongConfig) -> str:
    for kind, cls in _LONG_KINDS.items():
        if type(cfg) is cls:
            return kind
    raise TypeError(f"unknown long-sequence config {type(cfg).__name__}")


def _from_fields(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**kwargs)


@dataclass(frozen=True)
class RankerConfig:
    """Everything that rebuilds a ranker: preset name, features, and one config per part."""

    preset: str  # the preset it was built from (din, din_long, sdim, dare, diffumin) or "custom"
    features: FeatureSpec = field(default_factory=FeatureSpec)  # how store reads become tensors
    embed_dim: int = 16  # width of the item and the category embedding; a behavior is 2*embed_dim
    short: DINConfig | None = field(default_factory=DINConfig)  # short-window DIN; None = no short part
    long: LongConfig | None = None  # long-sequence module; None = short-only (din)
    over: OverConfig = field(default_factory=OverConfig)  # MLP head
    mba_l2: float = 0.0  # DIN mini-batch-aware L2 λ on embedding rows in the batch (0 = off)
    seed: int = 0  # parameter-initialisation seed (same seed, same initial weights)

    def __post_init__(self) -> None:
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if self.short is None and self.long is None:
            raise ValueError("a ranker needs a short part, a long part, or both")
        if self.short is not None and self.short.length == 0:
            raise ValueError("short.length must be > 0 (use long=DINConfig(length=0) for full attention)")
        if self.mba_l2 < 0:
            raise ValueError(f"mba_l2 must be >= 0, got {self.mba_l2}")
        if isinstance(self.long, DiffuMINConfig):
            d = 2 * self.embed_dim
            if self.long.channels > d:
                raise ValueError(f"DiffuMIN channels ({self.long.channels}) must be <= behavior width {d}")
            if d % self.long.heads:
                raise ValueError(f"DiffuMIN heads ({self.long.heads}) must divide behavior width {d}")

    @property
    def item_dim(self) -> int:
        """Width of one behavior/candidate embedding: concat(item, category)."""
        return 2 * self.embed_dim

    @property
    def long_kind(self) -> str | None:
        """``din``, ``sdim``, ``dare``, ``diffumin`` or None."""
        return None if self.long is None else _long_kind(self.long)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; :meth:`from_dict` inverts it exactly."""
        return {
            "preset": self.preset,
            "features": self.features.to_dict(),
            "embed_dim": self.embed_dim,
            "short": None if self.short is None else dataclasses.asdict(self.short),
            "long": None if self.long is None else {"kind": _long_kind(self.long),
                                                    **dataclasses.asdict(self.long)},
            "over": {**dataclasses.asdict(self.over), "hidden": list(self.over.hidden)},
            "mba_l2": self.mba_l2,
            "seed": self.seed,
        }

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RankerConfig:
        """Rebuild from :meth:`to_dict` output (unknown keys are an error, not ignored)."""
        d = dict(d)
        long = d.pop("long", None)
        if long is not None:
            long = dict(long)
            kind = long.pop("kind")
            if kind not in _LONG_KINDS:
                raise ValueError(f"unknown long-sequence kind {kind!r}")
            if kind == "diffumin":
                # written before the head options existed: those models have the paper's head
                long.setdefault("head_features", "paper")
                long.setdefault("generated_scale_init", 1.0)
            long = _from_fields(_LONG_KINDS[kind], long)
        short = d.pop("short", None)
        features = FeatureSpec.from_dict(d.pop("features", {}))
        over = _from_fields(OverConfig, d.pop("over", {}))
        config: RankerConfig = _from_fields(RankerConfig, {
            **d, "features": features, "over": over, "long": long,
            "short": None if short is None else _from_fields(DINConfig, short),
        })
        return config
