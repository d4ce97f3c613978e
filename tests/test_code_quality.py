"""STYLE R9 lint over ``models/`` (torchrec ``linter/module_linter.py`` style, by AST):

- every public ``nn.Module`` subclass has a docstring with an ``Args:`` and an ``Example:`` section;
- its constructor takes at most 5 arguments (past that: a frozen config dataclass);
- and the examples run (doctest), so they cannot rot.
"""

from __future__ import annotations

import ast
import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MAX_CTOR_ARGS = 5
_MODULE_BASES = {"Module", "nn.Module", "torch.nn.Module"}


def _base_name(node: ast.expr) -> str:
    return ast.unparse(node)


def _classes() -> list[tuple[Path, ast.ClassDef]]:
    out = []
    for path in sorted(MODELS.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        out += [(path, n) for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    return out


def _module_classes() -> list[tuple[Path, ast.ClassDef]]:
    """Classes that derive from nn.Module, directly or through another class in models/."""
    classes = _classes()
    modules = set(_MODULE_BASES)
    changed = True
    while changed:
        changed = False
        for _, cls in classes:
            if cls.name not in modules and any(_base_name(b).split(".")[-1] in modules or _base_name(b) in modules
                                               for b in cls.bases):
                modules.add(cls.name)
                changed = True
    return [(p, c) for p, c in classes if c.name in modules]


def _public(path: Path, cls: ast.ClassDef) -> bool:
    return not cls.name.startswith("_")


PUBLIC = [(p, c) for p, c in _module_classes() if _public(p, c)]


def test_lint_finds_the_rankers():
    names = {c.name for _, c in PUBLIC}
    assert {"Ranker", "RankerTrain", "DINAttention", "SDIMSequenceArch", "DARESequenceArch",
            "DiffuMINArch", "OverArch"} <= names


@pytest.mark.parametrize("path,cls", PUBLIC, ids=[c.name for _, c in PUBLIC])
def test_public_modules_document_args_and_example(path, cls):
    doc = ast.get_docstring(cls) or ""
    where = f"{path.relative_to(ROOT)}:{cls.lineno} {cls.name}"
    assert "Args:" in doc, f"{where}: docstring needs an Args: section"
    assert "Example:" in doc and ">>>" in doc, f"{where}: docstring needs a runnable Example:"


@pytest.mark.parametrize("path,cls", PUBLIC, ids=[c.name for _, c in PUBLIC])
def test_constructors_take_at_most_five_arguments(path, cls):
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            a = node.args
            n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - 1  # minus self
            n += int(a.vararg is not None) + int(a.kwarg is not None)
            assert n <= MAX_CTOR_ARGS, f"{cls.name}.__init__ takes {n} arguments: use a config dataclass"


def _module_names() -> list[str]:
    names = {".".join(p.relative_to(ROOT).with_suffix("").parts) for p, _ in PUBLIC}
    return sorted(n.removesuffix(".__init__") for n in names)


@pytest.mark.parametrize("name", _module_names())
def test_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name}: no doctest example was found"
    assert result.failed == 0, f"{name}: {result.failed} doctest example(s) failed"
