"""Domain errors of the scorer. :class:`serving.interceptors.ExceptionToStatusInterceptor` is the one
place that maps them to gRPC status codes (STYLE R14); nothing else in ``serving/`` picks codes.

=====================  =======================
error                  gRPC status
=====================  =======================
InvalidRequest         INVALID_ARGUMENT
ModelNotLoaded         UNAVAILABLE
StoreUnavailable       UNAVAILABLE
Overloaded             RESOURCE_EXHAUSTED
DeadlineTooShort       DEADLINE_EXCEEDED
anything else          INTERNAL (generic text)
=====================  =======================
"""

from __future__ import annotations

__all__ = [
    "DeadlineTooShort",
    "InvalidRequest",
    "ModelNotLoaded",
    "Overloaded",
    "ScorerError",
    "StoreUnavailable",
]


class ScorerError(Exception):
    """Root of the scorer's domain errors. The message is safe to send to the client."""


class InvalidRequest(ScorerError):
    """The request is malformed. The message is one sentence that names the offending field."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field} {problem}.")


class ModelNotLoaded(ScorerError):
    """No model has been loaded yet (startup, or the registry has no version under the alias)."""


class StoreUnavailable(ScorerError):
    """The sequence store is not open yet (e.g. the worker has not created it) or not reachable."""


class Overloaded(ScorerError):
    """Too many requests are in flight; the client should back off and retry elsewhere."""


class DeadlineTooShort(ScorerError):
    """Too little of the caller's deadline is left to score; answering late would be useless."""
