"""The core modules stay free of I/O: no anyio, no sockets, no clock (DESIGN.md, Layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = [
    "_admission.py",
    "_backoff.py",
    "_errors.py",
    "_flapping.py",
    "_framing.py",
    "_heartbeat.py",
    "_reasons.py",
    "_registry.py",
    "_validate.py",
]
FORBIDDEN = {"anyio", "trio", "asyncio", "socket", "select", "selectors", "time", "ssl"}
SRC = Path(__file__).resolve().parent.parent / "src" / "keepconn"


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_no_io(module: str) -> None:
    tree = ast.parse((SRC / module).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{module} imports {sorted(imported & FORBIDDEN)}"
