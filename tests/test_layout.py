"""The layers of docs/design.md, read off the tree: what each part may import, and how big it is.

Every rule is checked by reading the source with ``ast`` (nothing is imported), so a module
that breaks one fails here by name, before anyone has to notice it in review.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = SRC / "keepconn"

#: What the sans-I/O core may never import: I/O, event loops, threads and clocks.
IO_AND_TIME = {"anyio", "trio", "asyncio", "socket", "select", "selectors", "ssl", "threading"}
IO_AND_TIME |= {"time", "os", "subprocess", "uvloop", "sniffio"}
#: The only places that may import anyio (or an event loop directly).
ANYIO_HOMES = (
    "keepconn._anyio",
    "keepconn._asyncio",
    "keepconn._trio",
    "keepconn.client",
    "keepconn.testing",
    "keepconn.cluster",
)
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> Iterator[tuple[str, int]]:
    """Every module ``name`` imports (absolute, relative resolved), with the line; imports
    under ``if TYPE_CHECKING:`` included: a type-only cycle is still a cycle to a reader."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield target, node.lineno
            # "from . import x" and "from .pkg import mod" may name modules, not attributes.
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    yield f"{target}.{alias.name}", node.lineno


def test_the_core_exists_with_the_pure_modules() -> None:
    core = {name.rpartition(".")[2] for name in MODULES if name.startswith("keepconn._core.")}
    wanted = {"registry", "heartbeat", "admission", "flapping", "backoff", "framing"}
    wanted |= {"reasons", "errors", "validate", "events", "config", "opening"}
    assert wanted <= core, sorted(wanted - core)


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith("keepconn._core")])
def test_core_module_imports_no_io_no_time_and_nothing_outside_the_core(name: str) -> None:
    for target, line in imports_of(name):
        top = target.split(".")[0]
        assert top not in IO_AND_TIME, f"{name}:{line} imports {target}"
        if top == "keepconn":
            assert target.startswith("keepconn._core"), f"{name}:{line} imports {target}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_only_the_adapters_import_anyio(name: str) -> None:
    if name.startswith(ANYIO_HOMES):
        return
    for target, line in imports_of(name):
        assert target.split(".")[0] not in {"anyio", "trio", "asyncio", "sniffio"}, (
            f"{name}:{line} imports {target}: only {', '.join(ANYIO_HOMES)} may"
        )


@pytest.mark.parametrize("name", sorted(MODULES))
def test_only_the_cluster_adapter_imports_the_redis_client(name: str) -> None:
    # The server speaks to the store through a small protocol (_anyio/cluster.py); keepconn
    # without the redis extra must import and run without coredis.
    if name.startswith("keepconn.cluster"):
        return
    for target, line in imports_of(name):
        assert target.split(".")[0] != "coredis", f"{name}:{line} imports {target}"


def test_no_import_cycle() -> None:
    graph = {
        name: {target for target, _ in imports_of(name) if target in MODULES and target != name}
        for name in MODULES
    }
    # A package's __init__ importing its own submodules is how re-exports work; what must not
    # happen is a submodule importing back up into something that imports it.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not (t.startswith(name + ".") and name in t)}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name) :] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_every_source_file_reads_in_one_sitting(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines"


@pytest.mark.parametrize("folder", ["examples", "benchmarks", "tests"])
def test_nothing_edits_sys_path(folder: str) -> None:
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr == "path":
                value = node.value
                assert not (isinstance(value, ast.Name) and value.id == "sys"), (
                    f"{path.relative_to(ROOT)}:{node.lineno} uses sys.path"
                )


def own_private_fields(tree: ast.AST) -> set[str]:
    """Private attributes a module's own classes declare (``self._x = ...``, ``_x: T``)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "self" and isinstance(node.ctx, ast.Store):
                found.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    found.add(item.target.id)
    return found


def test_no_module_writes_another_modules_private_state() -> None:
    # One connection owns its own state: the server and the connector call its methods and
    # read its properties. Writing ``something._field`` is allowed only in the module whose
    # classes declare that field (the registry files its own sessions, say).
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        own = own_private_fields(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)):
                continue
            if not node.attr.startswith("_") or node.attr.startswith("__"):
                continue  # public fields, and dunders (__module__) that are metadata
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in {"self", "cls"}:
                continue
            assert node.attr in own, f"{name}:{node.lineno} writes {ast.unparse(node)}"


def test_the_project_carries_its_own_design_document() -> None:
    design = ROOT / "docs" / "design.md"
    assert design.is_file()
    text = design.read_text()
    for layer in ("_core/", "_anyio/", "tcp/", "client/", "testing/"):
        assert layer in text, f"docs/design.md does not describe {layer}"
