"""The core stays sans-IO: no module in pgproto/ imports an IO or clock module.

Checking ``sys.modules`` would prove nothing (``ssl`` itself imports
``socket``), so this walks the syntax tree of every module instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

FORBIDDEN = frozenset({"socket", "select", "selectors", "asyncio", "trio", "anyio", "time"})
CORE = Path(__file__).resolve().parent.parent / "pgproto"


def imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name | ast.Attribute)
            and getattr(node.func, "id", getattr(node.func, "attr", None))
            in ("__import__", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value.split(".")[0])
    return names


def core_modules() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def test_core_has_modules() -> None:
    assert len(core_modules()) >= 5


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: p.name)
def test_core_module_imports_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert not imported_modules(tree) & FORBIDDEN


@pytest.mark.parametrize(
    "source",
    [
        "import socket",
        "import os, select",
        "from asyncio import sleep",
        "from time import monotonic",
        "import trio.lowlevel",
        "importlib.import_module('selectors')",
        "__import__('anyio')",
    ],
)
def test_checker_catches_forbidden_imports(source: str) -> None:
    assert imported_modules(ast.parse(source)) & FORBIDDEN


def test_checker_ignores_relative_and_other_imports() -> None:
    assert not imported_modules(ast.parse("from . import _time\nimport ssl\nimport os")) & FORBIDDEN
