"""gRPC scorer: scores ad candidates for a user from the live lifelong sequence (DESIGN.md §3).

Public surface: the domain :class:`Scorer` and its model holder :class:`LoadedModel`, model
sources with hot reload, the server and its settings, and the client. Generated stubs live in
``serving.proto``; CLI hooks in ``serving.cli``.
"""

from serving.client import ScorerClient, TlsConfig
from serving.config import ServerConfig
from serving.errors import DeadlineTooShort, InvalidRequest, ModelNotLoaded, Overloaded, ScorerError, StoreUnavailable
from serving.model_source import DirectoryModelSource, MlflowModelSource, ModelReloader, ModelSource
from serving.scorer import LoadedModel, Scorer, ScoreResult, ScoringRequest
from serving.server import ScorerServer, ServerThread, serve

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
