"""The gateway's command line: every option, its default and its help (``gateway.py --help``).

``gateway.py`` turns the parsed options into keepconn's configuration and runs the gateway;
README.md's "Options" table says the same as the help texts here.
"""

from __future__ import annotations

import argparse
from typing import Any

from device_gateway.mqtt_codec import DEFAULT_MAX_REMAINING_LENGTH

__all__ = ["build_parser"]


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line (every option has a default except --users)."""
    p = argparse.ArgumentParser(
        prog="gateway.py",
        description="MQTT 3.1.1 device gateway on keepconn.",
        epilog="Users files: `gateway.py passwd --help`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    pos_f, pos_i = _positive(float), _positive(int)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on ('' for all)")
    p.add_argument("--port", type=int, default=1883, help="MQTT port (0: pick a free one)")
    p.add_argument(
        "--users",
        help="file of username:scrypt$... lines, written by `gateway.py passwd` (needed unless "
        "--require-client-cert)",
    )
    p.add_argument(
        "--allow-plaintext-users",
        action="store_true",
        help="accept clear-text username:password lines in --users (warned about at start)",
    )
    p.add_argument("--tls-cert", help="PEM certificate (chain): serve MQTT over TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-ca", help="PEM CA certificates whose client certificates are accepted (optional)"
    )
    p.add_argument(
        "--require-client-cert",
        action="store_true",
        help="every client must present a certificate from --tls-ca; its CN is the user, and "
        "no password is asked",
    )
    p.add_argument("--data", default="telemetry.sqlite3", help="SQLite file for telemetry")
    p.add_argument("--hello-timeout", type=pos_f, default=10.0, help="seconds to send CONNECT")
    p.add_argument(
        "--max-keepalive",
        type=pos_i,
        default=1800,
        help="largest client keepalive honoured, seconds (larger ones are capped to it)",
    )
    p.add_argument(
        "--idle-timeout", type=pos_f, default=300.0, help="timeout of keepalive-0 clients, s"
    )
    p.add_argument(
        "--resolution",
        type=pos_f,
        default=None,
        help="reaping granularity, s (None: min(1, idle-timeout/10))",
    )
    p.add_argument(
        "--max-packet", type=pos_i, default=DEFAULT_MAX_REMAINING_LENGTH, help="bytes per packet"
    )
    p.add_argument("--tcp-keepalive-idle", type=pos_i, default=60, help="TCP_KEEPIDLE, s")
    p.add_argument("--tcp-keepalive-interval", type=pos_i, default=10, help="TCP_KEEPINTVL, s")
    p.add_argument("--tcp-keepalive-count", type=pos_i, default=6, help="TCP_KEEPCNT")
    p.add_argument("--no-tcp-keepalive", action="store_true", help="leave the kernel's setting")
    p.add_argument("--accept-rate", type=pos_f, default=1000.0, help="connections/s sustained")
    p.add_argument("--accept-burst", type=pos_i, default=3000, help="connections at once")
    p.add_argument("--max-pending-hellos", type=pos_i, default=4096, help="CONNECTs awaited")
    p.add_argument("--max-sessions", type=pos_i, default=None, help="live sessions (None: no cap)")
    p.add_argument(
        "--max-loop-lag",
        type=pos_f,
        default=1.0,
        help="refuse new connections while the event loop lags more, s",
    )
    p.add_argument(
        "--max-accept-delay",
        type=pos_f,
        default=2.0,
        help="refuse connections that waited longer in the listen queue, s",
    )
    p.add_argument(
        "--no-load-shedding", action="store_true", help="no refusals for loop lag or queue delay"
    )
    p.add_argument("--no-admission", action="store_true", help="admit every connection")
    p.add_argument(
        "--no-gc-pacing",
        action="store_true",
        help="let full garbage collections run in reconnect storms too",
    )
    p.add_argument(
        "--gc-collect",
        action="store_true",
        help="let CPython run full garbage collections between storms and end a storm's hold "
        "with one, instead of freezing what survives",
    )
    p.add_argument("--flap-max-hellos", type=pos_i, default=15, help="CONNECTs per window")
    p.add_argument("--flap-window", type=pos_f, default=60.0, help="flapping window, s")
    p.add_argument("--flap-ban", type=pos_f, default=300.0, help="flapping ban, s")
    p.add_argument("--no-flapping", action="store_true", help="no flapping bans")
    p.add_argument("--shutdown-grace", type=pos_f, default=5.0, help="seconds to drain on exit")
    p.add_argument(
        "--status-port", type=int, default=0, help="loopback HTTP status page port (0: off)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        help="Prometheus /metrics port (0: off; /metrics is on the status page too)",
    )
    p.add_argument(
        "--metrics-host", default="127.0.0.1", help="address for --metrics-port ('' for all)"
    )
    p.add_argument(
        "--status-host",
        default="127.0.0.1",
        help="address of the status page; it has no authentication, so keep it on loopback",
    )
    p.add_argument(
        "--cluster",
        metavar="redis://HOST:PORT[/DB]",
        help="share sessions with every gateway using this Redis: one live connection per "
        "device across all of them (README: 'A cluster of gateways'); needs keepconn[redis]",
    )
    p.add_argument(
        "--node-id",
        help="this gateway's name in the cluster (default: <hostname>-<pid>); unique per node",
    )
    p.add_argument(
        "--node-ttl",
        type=pos_f,
        default=10.0,
        help="the node's lease in the store, s: a dead node's devices are free after this long; "
        "a node cut off from the store closes its sessions by then",
    )
    p.add_argument(
        "--store-timeout",
        type=pos_f,
        default=0.5,
        help="seconds a store call may take; a CONNECT the store cannot confirm in time gets "
        "CONNACK 3 (must be < --node-ttl / 2)",
    )
    p.add_argument(
        "--workers",
        type=pos_i,
        default=1,
        help="gateway processes sharing --port with SO_REUSEPORT; each gets its own --data, "
        "--status-port and --node-id (README: 'Several processes')",
    )
    p.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind --port with SO_REUSEPORT, so that other gateways may share it",
    )
    # Set by the --workers supervisor on each worker's command line, not by hand.
    p.add_argument("--worker-index", type=pos_i, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--backend", choices=("asyncio", "uvloop", "trio"), default="asyncio", help="event loop"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        type=str.lower,
        help="stderr logging; info logs one line per close",
    )
    return p
