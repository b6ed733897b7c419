"""Sphinx configuration of keepconn's documentation site (``make docs``).

Why Sphinx: autodoc documents the objects themselves (each claims its public namespace as its
``__module__``, so the reference names the import users write), intersphinx links to Python's
own reference, the doctest builder runs the reference's examples, and MyST reads the Markdown
pages the repository already has; anyio, trio and websockets document themselves the same way.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sysconfig
from pathlib import Path
from typing import Any

import keepconn


def _load_extension(name: str) -> Any:
    # The site's own extension is loaded from its file: no sys.path edits (docs/design.md).
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).parent / "_ext" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_reference = _load_extension("keepconn_reference")

project = "keepconn"
author = "the keepconn authors"
copyright = "the keepconn authors"
release = keepconn.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_inventories", "_ext", "Thumbs.db", ".DS_Store"]
root_doc = "index"
html_theme = "furo"
html_title = f"keepconn {release}"

myst_enable_extensions = ["colon_fence"]
# A fence in a language Pygments does not know (the gateway README's ```jsonc) is shown
# uncoloured: the page is right, so that is not worth failing the build over.
suppress_warnings = ["misc.highlighting_failure"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
# Types in the signatures: a class's fields table (or its :param: list) says what each means.
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = True
# Defaults as the source writes them (``registry=REGISTRY``), not their reprs.
autodoc_preserve_defaults = True

# The doctest builder runs every `>>>` example of the reference's docstrings and of the pages.
doctest_test_doctest_blocks = "default"
# Docstring examples run as if in the namespace that exports them; the namespace's names are
# there, as they would be for a user who imported them.
# Some examples run a server and a client on loopback: one that hangs fails the build after a
# minute (SIGALRM) instead of holding it until an outer timeout.
doctest_global_setup = """
import signal as _signal

def _hung(signum, frame):
    raise TimeoutError("a documentation example ran for 60 s")

_signal.signal(_signal.SIGALRM, _hung)
_signal.alarm(60)

import keepconn
from keepconn import *
from keepconn.tcp import *
from keepconn.client import *
"""
doctest_global_cleanup = "_signal.alarm(0)"


def _inventory(candidates: list[str]) -> str | None:
    for pattern in candidates:
        for found in sorted(glob.glob(pattern), reverse=True):
            return found
    return None


# Intersphinx without a network: an inventory is used only where a local copy exists (Debian's
# python3-doc and python-attr-doc, installed by scripts/docdeps.sh, or a file dropped into
# docs/_inventories/NAME.inv); a project without one is left out, so an offline build has no
# "failed to reach any of the inventories" warning (which -W makes fatal) and its references to
# that project render as plain text. KEEPCONN_DOCS_ONLINE=1 fetches the missing ones instead.
_here = Path(__file__).parent
_py = sysconfig.get_python_version()
_projects = {
    "python": (
        f"https://docs.python.org/{_py}",
        [
            str(_here / "_inventories" / "python.inv"),
            f"/usr/share/doc/python{_py}/html/objects.inv",
            "/usr/share/doc/python3*/html/objects.inv",
        ],
    ),
    "attrs": (
        "https://www.attrs.org/en/stable",
        [
            str(_here / "_inventories" / "attrs.inv"),
            "/usr/share/doc/python-attr-doc/html/objects.inv",
        ],
    ),
    "anyio": (
        "https://anyio.readthedocs.io/en/stable",
        [str(_here / "_inventories" / "anyio.inv")],
    ),
    "trio": ("https://trio.readthedocs.io/en/stable", [str(_here / "_inventories" / "trio.inv")]),
}
_online = os.environ.get("KEEPCONN_DOCS_ONLINE") == "1"
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
for _name, (_url, _candidates) in _projects.items():
    _local = _inventory(_candidates)
    if _local is not None or _online:
        intersphinx_mapping[_name] = (_url, _local)


def setup(app: Any) -> dict[str, Any]:
    """The reference over each namespace's ``__all__`` (docs/_ext/keepconn_reference.py)."""
    result: dict[str, Any] = _reference.setup(app)
    return result
