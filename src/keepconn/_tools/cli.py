"""The ``keepconn`` command line (also ``python -m keepconn``).

Subcommands register themselves in :data:`COMMANDS` through :func:`command`, so a later module
(a gateway ``status``, say) adds one without touching the parser code::

    @command("status", help="...")
    def _status_args(parser: argparse.ArgumentParser) -> Runner:
        parser.add_argument(...)
        return run_status
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Callable, Sequence

__all__ = ["COMMANDS", "build_parser", "command", "main"]

#: What a subcommand's configure function returns: the function that runs it (exit status).
Runner = Callable[[argparse.Namespace], int]
#: name -> (one-line help, configure(parser) -> runner).
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Runner]]] = {}


def command(
    name: str, *, help: str
) -> Callable[[Callable[[argparse.ArgumentParser], Runner]], Callable[..., Runner]]:
    """Register a subcommand: the decorated function adds its arguments and returns its runner."""

    def register(
        configure: Callable[[argparse.ArgumentParser], Runner],
    ) -> Callable[[argparse.ArgumentParser], Runner]:
        if name in COMMANDS:
            raise ValueError(f"subcommand {name!r} registered twice")
        COMMANDS[name] = (help, configure)
        return configure

    return register


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="keepconn", description="Inspect TCP liveness from the kernel's side."
    )
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, configure) in sorted(COMMANDS.items()):
        sub = subs.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_run=configure(sub))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``keepconn`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args._run(args)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"keepconn {args.command}: {exc}", file=sys.stderr)
        return 2
    return status


# -- doctor -----------------------------------------------------------------------------------


@command("doctor", help="explain this kernel's TCP settings and recommend per-socket keepalive")
def _doctor_args(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a setting is a real problem"
    )
    parser.add_argument(
        "--detect-within",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how fast a dead idle peer should be found (shapes the recommendation)",
    )
    parser.add_argument(
        "--sysctl-root",
        default="/proc/sys",
        metavar="DIR",
        help="read settings from a copy of /proc/sys (e.g. one saved from another host)",
    )

    def run(args: argparse.Namespace) -> int:
        from .doctor import diagnose, report

        return report(
            diagnose(args.sysctl_root), detect_within=args.detect_within, strict=args.strict
        )

    return run


# -- sockets ----------------------------------------------------------------------------------


@command("sockets", help="the kernel's TCP sockets on a port, per state, flagging leaks")
def _sockets_args(parser: argparse.ArgumentParser) -> Runner:
    parser.add_argument("--port", type=int, help="local port (default: every socket)")
    parser.add_argument(
        "--watch", type=float, metavar="SECONDS", help="refresh every SECONDS until interrupted"
    )
    parser.add_argument(
        "--pid", type=int, help="read the network namespace of this process (containers)"
    )
    parser.add_argument(
        "--show", type=int, default=10, metavar="N", help="list at most N flagged sockets"
    )
    return _run_sockets


_STATE_ORDER = (
    "LISTEN",
    "SYN_RECV",
    "ESTABLISHED",
    "CLOSE_WAIT",
    "LAST_ACK",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "CLOSING",
    "TIME_WAIT",
)


def _run_sockets(args: argparse.Namespace) -> int:
    from ..tcp import census

    first_seen: dict[tuple[str, int, str, int, int], float] = {}
    while True:
        now = time.monotonic()
        snap = census(args.port, pid=args.pid)
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        where = f"port {args.port}" if args.port is not None else "all ports"
        print(f"{stamp}  TCP sockets on {where}: {len(snap)}")
        states = sorted(
            snap.counts,
            key=lambda s: (_STATE_ORDER.index(s) if s in _STATE_ORDER else len(_STATE_ORDER), s),
        )
        for state in states:
            print(f"  {state:<12} {snap.counts[state]:>7}")
        if not states:
            print("  (none)")

        # A socket's identity across snapshots: its 4-tuple and inode.
        keys = {
            (r.local_address, r.local_port, r.remote_address, r.remote_port, r.inode): r
            for r in snap.sockets
        }
        first_seen = {k: first_seen.get(k, now) for k in keys}
        close_wait = [k for k, r in keys.items() if r.state == "CLOSE_WAIT"]
        if close_wait:
            old = [k for k in close_wait if now - first_seen[k] >= (args.watch or 0)]
            lasting = f", {len(old)} seen for {args.watch:g} s or more" if args.watch else ""
            print(
                f"! {len(close_wait)} CLOSE_WAIT{lasting}: the peer closed and the application "
                "has not; each is a leak unless it closes soon"
            )
            for k in close_wait[: args.show]:
                age = now - first_seen[k]
                print(f"    {k[0]}:{k[1]} <- {k[2]}:{k[3]}  seen {age:.0f} s")
        bare = [r for r in snap.sockets if r.state == "ESTABLISHED" and r.timer == "off"]
        if bare:
            print(
                f"! {len(bare)} ESTABLISHED with no keepalive timer: if the peer vanishes while "
                "idle, only an application heartbeat will ever notice"
            )
        stuck = [r for r in snap.sockets if r.state == "ESTABLISHED" and r.retransmits >= 3]
        if stuck:
            print(f"! {len(stuck)} ESTABLISHED retransmitting (3+ unanswered): peers likely gone")
            for r in stuck[: args.show]:
                print(
                    f"    {r.local_address}:{r.local_port} -> {r.remote_address}:{r.remote_port}"
                    f"  retransmits={r.retransmits} send-queue={r.tx_queue}"
                )
        if not args.watch:
            return 0
        sys.stdout.flush()
        time.sleep(args.watch)
        print()
