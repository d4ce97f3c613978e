"""Every error the stream side raises on purpose derives from :class:`PipelineError`."""

from __future__ import annotations

__all__ = ["PipelineError", "StoreConfigError", "BrokerError", "ConfigError", "OffsetRegressionError"]


class PipelineError(Exception):
    """Root of ctrstream's stream-side errors."""


class ConfigError(PipelineError):
    """A setting is invalid; raised at start-up with one readable line."""


class StoreConfigError(ConfigError):
    """The store URI or its on-disk format is not usable (fix the URI, or rebuild the store)."""


class BrokerError(PipelineError):
    """The embedded broker could not start or does not answer."""


class OffsetRegressionError(PipelineError):
    """A commit would move a stored offset backwards: the worker's state and the log disagree."""
