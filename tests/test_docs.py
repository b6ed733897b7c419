"""The documentation site builds without a warning, its examples run, and it is complete.

The site is built the way ``make docs`` builds it (Sphinx, warnings as errors, no network:
docs/conf.py uses only intersphinx inventories found on disk), once as HTML and once with the
doctest builder, which runs every ``>>>`` example of the reference's docstrings and of the
pages. The reference is generated over each public namespace's ``__all__``: every name of
every namespace in tests/test_exports.py must have its entry in the built HTML.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import keepconn
from tests.test_exports import NAMESPACES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def sphinx(builder: str, out: Path, doctrees: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder]
        + ["-d", str(doctrees), str(DOCS), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("docs")
    result = sphinx("html", out / "html", out / "doctrees")
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    yield out


def test_the_site_builds_with_warnings_as_errors(built: Path) -> None:
    html = built / "html"
    for page in ["index", "intro/index", "howto/own-server", "topics/keepalive", "changelog"]:
        assert (html / f"{page}.html").is_file(), page
    assert (html / "benchmarks.html").is_file() and (html / "design.html").is_file()
    # The gateway's README is included whole, and the own-server programs are shown in full.
    assert "fleet" in (html / "howto" / "gateway.html").read_text()
    own = (html / "howto" / "own-server.html").read_text()
    assert own.count("reap_forever") >= 3


def test_make_docs_builds_the_same_way() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\ndocs:") :].split("\n\n")[0]
    assert "-m sphinx -W --keep-going" in recipe and "docs/_build/html" in recipe
    assert "/docs/_build/" in (ROOT / ".gitignore").read_text().splitlines()


def test_the_examples_in_the_reference_and_the_pages_run(built: Path) -> None:
    result = sphinx("doctest", built / "doctest", built / "doctrees")
    report = (built / "doctest" / "output.txt").read_text()
    assert result.returncode == 0, result.stderr + report
    ran = re.search(r"^\s*(\d+) tests$", report, re.M)
    assert ran is not None and int(ran.group(1)) >= 50, report
    assert "0 failures in tests" in report
    # Examples come from docstrings (the reference) and from pages (intro, topics); the
    # client and metrics topics run a real Server and Connector on loopback.
    pages = ["intro/index", "topics/keepalive", "topics/client", "topics/metrics"]
    for document in ["reference/keepconn", "reference/tcp", *pages]:
        assert f"Document: {document}\n" in report, document


def reference_html(built: Path) -> str:
    return "\n".join(page.read_text() for page in (built / "html" / "reference").glob("*.html"))


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_every_public_name_is_in_the_reference(built: Path, namespace: str) -> None:
    html = reference_html(built)
    module = importlib.import_module(namespace)
    missing = [name for name in module.__all__ if f'id="{namespace}.{name}"' not in html]
    assert not missing, f"{namespace}: not in the reference: {missing}"


def test_every_namespace_has_its_reference_page() -> None:
    pages = {
        match.group(1)
        for page in (DOCS / "reference").glob("*.rst")
        for match in re.finditer(r"^\.\. keepconn-namespace:: (\S+)$", page.read_text(), re.M)
    }
    for namespace in set(NAMESPACES) - pages:
        page = namespace.removeprefix("keepconn.")
        title = f"{namespace}\n{'=' * len(namespace)}"
        pytest.fail(
            f"{namespace} has no reference page: add docs/reference/{page}.rst holding\n"
            f"{title}\n\n.. keepconn-namespace:: {namespace}"
        )
    assert pages <= set(NAMESPACES), f"pages of namespaces test_exports does not know: {pages}"


def python_blocks() -> Iterator[tuple[str, str]]:
    for page in sorted(DOCS.rglob("*.md")):
        if "_build" in page.parts:
            continue
        for block in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M):
            yield str(page.relative_to(ROOT)), block


def keepconn_names(tree: ast.AST) -> Iterator[tuple[str, str]]:
    """(module, attribute) pairs a snippet takes from keepconn: imports and ``keepconn.X``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("keepconn"):
            for alias in node.names:
                yield node.module or "", alias.name
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "keepconn":
                yield "keepconn", node.attr


def test_code_in_the_pages_parses_and_names_what_exists() -> None:
    # Fragments (``...`` for the parts a page leaves out, a top-level ``await``) are not run,
    # but they must parse, and every keepconn name they use must exist: a rename fails here.
    blocks = list(python_blocks())
    assert len(blocks) >= 5
    for where, block in blocks:
        tree = compile(block, where, "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        for module, name in keepconn_names(tree):
            assert hasattr(importlib.import_module(module), name), f"{where}: {module}.{name}"


def test_the_version_lives_in_one_place() -> None:
    # (No tomllib: the suite runs on Python 3.10 too.)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]$', pyproject, re.M)
    assert not re.search(r"^version = \"", pyproject, re.M)
    assert 'version = { attr = "keepconn.__version__" }' in pyproject
    assert importlib.metadata.version("keepconn") == keepconn.__version__
    changelog = (ROOT / "CHANGELOG.md").read_text()
    latest = re.search(r"^## (\S+)", changelog, re.M)
    assert latest is not None and latest.group(1) == keepconn.__version__
