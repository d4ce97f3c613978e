"""Kernel-test fixtures: reset the backend log per test and enforce STYLE R6 for interpret tests."""

from __future__ import annotations

import os

import pytest
import torch

from triton_kernels.backend import Backend, reset_resolution_log, resolution_counts


@pytest.fixture(autouse=True)
def _triton_must_run(request: pytest.FixtureRequest):
    """Every ``interpret``/``gpu`` test must have dispatched at least one op to Triton."""
    reset_resolution_log()
    yield
    marked = request.node.get_closest_marker("interpret") or request.node.get_closest_marker("gpu")
    if marked and os.environ.get("REQUIRE_TRITON") == "1":
        ran = [op for (op, backend), n in resolution_counts().items() if backend is Backend.TRITON and n]
        assert ran, f"{request.node.nodeid}: no op resolved to Backend.TRITON (R6)"


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator for test inputs."""
    return torch.Generator().manual_seed(1234)
