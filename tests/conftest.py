"""Shared pytest configuration: every async test runs on asyncio, uvloop and trio."""

from __future__ import annotations

import pytest

from tests.tlscerts import Pki, make_pki, require_openssl

pytest_plugins = ["anyio"]


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The TLS tests' CA and certificates (tests/tlscerts.py), made once per run."""
    require_openssl()
    return make_pki(tmp_path_factory.mktemp("pki"))
