"""The gateway paces full garbage collections by default (its storm's loop lag depends on it):
on plain TCP on asyncio and uvloop a storm's survivors are frozen (a closed session is freed
by reference counting there: tests/examples/test_gateway_garbage.py), elsewhere the release
collects; ``--gc-collect`` always collects, ``--no-gc-pacing`` leaves CPython's collector alone."""

from __future__ import annotations

import pytest

from device_gateway import gateway as gateway_app
from keepconn import GcPacing


def config_for(*argv: str) -> GcPacing | None:
    args = gateway_app.build_parser().parse_args(["--users", "users.txt", *argv])
    return gateway_app.server_config(args).gc_pacing


@pytest.mark.parametrize("backend", ["asyncio", "uvloop"])
def test_the_gateway_paces_and_freezes_by_default_on_plain_tcp(backend: str) -> None:
    assert config_for("--backend", backend) == GcPacing(freeze=True)


@pytest.mark.parametrize(
    "argv",
    [
        ["--backend", "trio"],
        ["--tls-cert", "c.pem", "--tls-key", "k.pem"],
        ["--gc-collect"],
    ],
)
def test_elsewhere_or_when_asked_the_release_collects(argv: list[str]) -> None:
    assert config_for(*argv) == GcPacing(freeze=False)


def test_no_gc_pacing_leaves_the_collector_alone() -> None:
    assert config_for("--no-gc-pacing") is None
