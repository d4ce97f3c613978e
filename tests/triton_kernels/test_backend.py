"""Backend resolution (STYLE R6), the public surface (R1, R12) and the reference's purity (R2)."""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest
import torch

import triton_kernels
from triton_kernels import Backend, KernelUnavailableError, reference
from triton_kernels.backend import last_resolved, resolution_counts, resolve_backend

OPS = ["dare_search", "sdim_bucket_sums", "sdim_gather", "sdim_hash", "target_attention"]
PKG = pathlib.Path(triton_kernels.__file__).parent


def test_public_surface() -> None:
    assert sorted(triton_kernels.__all__) == sorted(["Backend", "KernelUnavailableError", *OPS])


@pytest.mark.parametrize("op", OPS)
def test_dispatcher_signature_is_reference_plus_backend(op: str) -> None:
    pub = inspect.signature(getattr(triton_kernels, op))
    ref = inspect.signature(getattr(reference, op))
    params = list(pub.parameters.values())
    assert params[-1].name == "backend" and params[-1].default is Backend.AUTO
    assert params[-1].kind is inspect.Parameter.KEYWORD_ONLY
    assert [(p.name, p.kind, p.default) for p in params[:-1]] == [
        (p.name, p.kind, p.default) for p in ref.parameters.values()]


@pytest.mark.parametrize("path", sorted((PKG / "reference").glob("*.py")), ids=lambda p: p.name)
def test_reference_never_imports_triton(path: pathlib.Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        assert not any(n.split(".")[0] == "triton" or "_triton" in n for n in names), (path, names)


def test_auto_resolves_to_torch_on_cpu() -> None:
    assert resolve_backend("probe", Backend.AUTO, torch.device("cpu")) is Backend.TORCH
    assert last_resolved("probe") is Backend.TORCH
    assert resolution_counts()[("probe", Backend.TORCH)] == 1


def test_auto_resolves_to_triton_on_cuda_device() -> None:
    assert resolve_backend("probe", "auto", torch.device("cuda", 0)) is Backend.TRITON


def test_triton_on_cpu_without_interpreter_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET=1"):
        triton_kernels.sdim_hash(torch.zeros(1, 1, 4), torch.zeros(4, 2), num_hashes=1, hash_bits=2,
                                 backend=Backend.TRITON)
    assert last_resolved("sdim_hash") is None  # nothing ran


def test_torch_backend_never_touches_triton() -> None:
    out = triton_kernels.sdim_hash(torch.ones(1, 2, 4), torch.ones(4, 2), num_hashes=1, hash_bits=2,
                                   backend=Backend.TORCH)
    assert out.tolist() == [[[3], [3]]]
    assert last_resolved("sdim_hash") is Backend.TORCH
