"""An optional backend or integration that is not installed fails in one line naming its extra.

Each case runs a real Python process whose import path holds only what keepconn itself needs
(anyio, attrs and their own dependencies, linked from this environment) and not the optional
package: the same interpreter a user has after ``pip install keepconn`` without the extra.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import keepconn

ROOT = Path(__file__).resolve().parent.parent
#: What ``pip install keepconn`` brings (the core's dependencies, and theirs), by import name.
CORE = [
    "keepconn",
    "anyio",
    "sniffio",
    "idna",
    "attr",
    "attrs",
    "typing_extensions",
    "exceptiongroup",
]


def bare_path(tmp_path: Path, extra: tuple[str, ...] = ()) -> Path:
    """A directory to put on the import path that holds the core and ``extra``, nothing else."""
    site = tmp_path / "site"
    site.mkdir()
    for name in [*CORE, *extra]:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            continue  # not needed on this Python (exceptiongroup on 3.11, say)
        source = Path(spec.origin)
        link = source.parent if source.name == "__init__.py" else source
        (site / link.name).symlink_to(link)
    return site


def run_bare(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)
    # -S: no site-packages, so nothing outside ``site`` (and the standard library) imports.
    return subprocess.run(
        [sys.executable, "-S", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_the_bare_environment_really_lacks_the_extras(tmp_path: Path) -> None:
    result = run_bare(
        bare_path(tmp_path),
        "-c",
        "import importlib.util as u, keepconn; "
        "print([m for m in ('trio', 'uvloop', 'prometheus_client') if u.find_spec(m)])",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(("backend", "extra"), [("trio", "trio"), ("uvloop", "uvloop")])
def test_check_backend_names_the_extra(tmp_path: Path, backend: str, extra: str) -> None:
    code = (
        "import keepconn\n"
        "try:\n"
        f"    keepconn.check_backend({backend!r})\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc.extra, exc.name, '|', exc)\n"
    )
    result = run_bare(bare_path(tmp_path), "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"MissingExtra {extra} {backend} | the {backend} backend needs {backend}: "
        f"pip install 'keepconn[{extra}]'"
    )


def test_installed_backends_pass_the_check() -> None:
    for backend in ["asyncio", "trio", "uvloop"]:
        keepconn.check_backend(backend)  # all three are installed for the suite
    with pytest.raises(keepconn.ConfigError, match="unknown backend 'twisted'"):
        keepconn.check_backend("twisted")


def test_metrics_without_prometheus_client_names_the_extra(tmp_path: Path) -> None:
    result = run_bare(bare_path(tmp_path), "-c", "import keepconn.metrics")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "keepconn.MissingExtra: keepconn.metrics needs prometheus_client: "
        "pip install 'keepconn[prometheus]'"
    )
    # `from None`: the one line is the whole story, no "No module named" chained above it.
    assert "During handling" not in result.stderr


@pytest.mark.parametrize("backend", ["trio", "uvloop"])
def test_gateway_with_a_missing_backend_says_so_in_one_line(tmp_path: Path, backend: str) -> None:
    site = bare_path(tmp_path, ("device_gateway",))
    gateway = ROOT / "examples" / "device_gateway" / "gateway.py"
    result = run_bare(site, str(gateway), "--port", "0", "--backend", backend)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"gateway: the {backend} backend needs {backend}: pip install 'keepconn[{backend}]'"
    )
