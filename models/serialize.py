"""Checkpoints: ``state_dict`` + ``config.json``, never a pickled module (DESIGN.md §3 Models).

A checkpoint directory holds ``config.json`` (``RankerConfig.to_dict()`` plus a format version)
and ``model.pt`` (the ranker's ``state_dict``, tensors only: it loads with
``torch.load(weights_only=True)``). The SDIM hash projection is a buffer, so it travels with the
weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from models.config import RankerConfig
from models.ranker import Ranker

__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "WEIGHTS_FILE", "load_ranker", "save_ranker"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
FORMAT_VERSION = 1


def save_ranker(ranker: Ranker, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.pt`` into ``directory`` (created if missing)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"format_version": FORMAT_VERSION, "config": ranker.config.to_dict()}
    (out / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))
    state = {k: v.detach().cpu() for k, v in ranker.state_dict().items()}
    torch.save(state, out / WEIGHTS_FILE)
    return out


def load_config(directory: str | Path) -> RankerConfig:
    """The :class:`RankerConfig` stored in a checkpoint directory."""
    doc = json.loads((Path(directory) / CONFIG_FILE).read_text())
    if doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint format {doc.get('format_version')!r}")
    return RankerConfig.from_dict(doc["config"])


def load_ranker(directory: str | Path, map_location: str | torch.device = "cpu") -> Ranker:
    """Rebuild the ranker from ``config.json`` and load ``model.pt``; returned in eval mode."""
    ranker = Ranker(load_config(directory))
    state = torch.load(Path(directory) / WEIGHTS_FILE, map_location=map_location, weights_only=True)
    ranker.load_state_dict(state)
    return ranker.to(map_location).eval()
