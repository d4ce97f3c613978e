"""Suite-wide fixtures and switches.

Triton's interpreter must be chosen before ``triton`` is imported anywhere, so this file sets
``TRITON_INTERPRET=1`` at import time whenever no CUDA device is visible (every CPU machine, CI
included). Kernel parity tests then run the real Triton kernels, interpreted, against the torch
references. ``REQUIRE_TRITON=1`` makes the kernel tests fail if a dispatcher resolved to the
reference instead of Triton (STYLE R6).
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("CUDA_VISIBLE_DEVICES_FORCE") else "1")
os.environ.setdefault("REQUIRE_TRITON", "1")
# Keep MLflow quiet and local in tests.
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

if torch.cuda.is_available():  # compiled kernels on a GPU machine
    os.environ["TRITON_INTERPRET"] = "0"

pytest_plugins = ["tests.fixtures"]


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_gpu = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (run `make test-gpu` there)"))
