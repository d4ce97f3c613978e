"""Serving test fixtures (factories in :mod:`tests.serving.fixtures`)."""

from tests.serving.fixtures import make_store, model_dir, start_server  # noqa: F401
