"""The gateway paces full garbage collections by default (its storm's loop lag depends on it),
and ``--no-gc-pacing`` leaves CPython's collector alone."""

from __future__ import annotations

from device_gateway import gateway as gateway_app
from keepconn import GcPacing


def config_for(*argv: str) -> GcPacing | None:
    args = gateway_app.build_parser().parse_args(["--users", "users.txt", *argv])
    return gateway_app.server_config(args).gc_pacing


def test_the_gateway_paces_full_collections_by_default() -> None:
    assert config_for() == GcPacing()


def test_no_gc_pacing_leaves_the_collector_alone() -> None:
    assert config_for("--no-gc-pacing") is None
