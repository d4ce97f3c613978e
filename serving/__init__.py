"""gRPC scorer: scores ad candidates for a user from the live lifelong sequence (DESIGN.md §3).

Public surface: the domain :class:`Scorer` and its model holder :class:`LoadedModel`, model
sources with hot reload, the server and its settings, and the client. Generated stubs live in
``serving.proto``; CLI hooks in ``serving.cli``.

Names are imported on first use (PEP 562), so ``from serving.client import ScorerClient`` (the
``ctrstream score`` command, benchmark load generators) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "DeadlineTooShort",
    "DirectoryModelSource",
    "InvalidRequest",
    "LoadedModel",
    "MlflowModelSource",
    "ModelNotLoaded",
    "ModelReloader",
    "ModelSource",
    "Overloaded",
    "ScoreResult",
    "Scorer",
    "ScorerClient",
    "ScorerError",
    "ScorerServer",
    "ScoringRequest",
    "ServerConfig",
    "ServerThread",
    "StoreUnavailable",
    "TlsConfig",
    "serve",
]

_HOME = {
    "ScorerClient": "serving.client",
    "TlsConfig": "serving.client",
    "ServerConfig": "serving.config",
    "DeadlineTooShort": "serving.errors",
    "InvalidRequest": "serving.errors",
    "ModelNotLoaded": "serving.errors",
    "Overloaded": "serving.errors",
    "ScorerError": "serving.errors",
    "StoreUnavailable": "serving.errors",
    "DirectoryModelSource": "serving.model_source",
    "MlflowModelSource": "serving.model_source",
    "ModelReloader": "serving.model_source",
    "ModelSource": "serving.model_source",
    "LoadedModel": "serving.scorer",
    "ScoreResult": "serving.scorer",
    "Scorer": "serving.scorer",
    "ScoringRequest": "serving.scorer",
    "ScorerServer": "serving.server",
    "ServerThread": "serving.server",
    "serve": "serving.server",
}

if TYPE_CHECKING:
    from serving.client import ScorerClient, TlsConfig
    from serving.config import ServerConfig
    from serving.errors import (
        DeadlineTooShort,
        InvalidRequest,
        ModelNotLoaded,
        Overloaded,
        ScorerError,
        StoreUnavailable,
    )
    from serving.model_source import DirectoryModelSource, MlflowModelSource, ModelReloader, ModelSource
    from serving.scorer import LoadedModel, Scorer, ScoreResult, ScoringRequest
    from serving.server import ScorerServer, ServerThread, serve


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
