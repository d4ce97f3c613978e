"""Rankers over lifelong behavior sequences (DIN, SDIM, DARE, DiffuMIN) and their shared features.

The public surface: build a preset (:func:`build_ranker`), train through :class:`RankerTrain`,
save/load through config + state_dict (:func:`save_ranker`, :func:`load_ranker`), and the one
feature function used by training and serving (:func:`build_batch`).
"""

from models.config import RankerConfig
from models.features import Batch, FeatureSpec, build_batch
from models.losses import RankerTrain
from models.ranker import PRESETS, Ranker, build_ranker
from models.serialize import load_ranker, save_ranker

__all__ = [
    "PRESETS",
    "Batch",
    "FeatureSpec",
    "Ranker",
    "RankerConfig",
    "RankerTrain",
    "build_batch",
    "build_ranker",
    "load_ranker",
    "save_ranker",
]
