"""Where one idle connection's tracked objects come from: the runtime benchmark's servers,
counted by type inside the server at two sizes.

    python benchmarks/runtime_census.py --only gateway --n1 2000 --n2 4000

For each server chosen (``--only``, the names of benchmarks/runtime.py; all Python ones by
default), a fresh process as runtime.py starts it (benchmarks/runtime_servers.py), clients that
grow to N1 idle connections and then to N2; after each ramp and a settle, the probe inside the
server (``{"cmd": "types"}`` of benchmarks/runtime_probe.py) counts the tracked objects by type
after a full collection. Printed per server: each type's change from N1 to N2 divided by the
connections added (count; ``sys.getsizeof`` bytes of the objects themselves, not of what
they point to; and referents, the references a full collection follows from them, which it
pays for as much as for the objects), largest first, and the totals. A type that changes by
less than ``--min`` per connection, in count and in referents, is left out (a fraction means
some connections hold one).

A diagnostic, not a comparison: the figures that go in the docs are runtime.py's. ``--quick``
(200 -> 400 connections) is the test suite's smoke check. ``--json`` writes the counts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device_gateway.gateway_process import write_users_file
from harness import sigterm_as_exit, write_json
from runtime_run import Params, _grow_timeout, _spec, _up, _wait
from runtime_servers import CONTENDERS, Account, Clients, Contender, ServerProcess

PYTHON_NAMES = tuple(c.name for c in CONTENDERS if c.python)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200 -> 400 connections: the smoke test")
    p.add_argument("--n1", type=int, help="first size (2000; quick: 200)")
    p.add_argument("--n2", type=int, help="second size (4000; quick: 400)")
    p.add_argument("--only", action="append", choices=PYTHON_NAMES, help="repeatable")
    p.add_argument("--settle", type=float, help="seconds after a ramp (5; quick: 1)")
    p.add_argument("--rate", type=float, default=500.0, help="new connections per second")
    p.add_argument("--min", type=float, default=0.05, help="smallest change shown, per conn")
    p.add_argument("--json", type=Path, help="the counts as JSON")
    return p.parse_args(argv)


def census(
    c: Contender, params: Params, workdir: Path, account: Account
) -> dict[str, dict[str, list[int]]]:
    """The objects by type inside ``c`` at N1 and at N2 connections."""
    server = ServerProcess(c, workdir, account, "census")
    clients: Clients | None = None
    found: dict[str, dict[str, list[int]]] = {}
    try:
        clients = Clients(_spec(c, server.port, params, account, "cs"), params.n2, 2)
        for label, n in (("n1", params.n1), ("n2", params.n2)):
            up = _up(clients.grow(n, _grow_timeout(n, params)))
            if up != n:
                raise RuntimeError(f"{c.name}: {up} of {n} connections up")
            _wait(params.settle, server)
            found[label] = dict(server.ask("types")["types"])
    finally:
        if clients is not None:
            clients.stop()
        server.stop()
    return found


Row = tuple[str, float, float, float]


def per_connection(
    found: dict[str, dict[str, list[int]]], added: int, smallest: float
) -> list[Row]:
    """(type, objects, bytes, referents per connection), largest count first. A type that
    grows in referents but not in count (a dict or list keyed by connection) is shown too."""
    rows = []
    for name in found["n1"].keys() | found["n2"].keys():
        a = found["n1"].get(name, [0, 0, 0])
        b = found["n2"].get(name, [0, 0, 0])
        count, size, refs = ((b[i] - a[i]) / added for i in range(3))
        if abs(count) >= smallest or abs(refs) >= smallest:
            rows.append((name, count, size, refs))
    rows.sort(key=lambda row: (-row[1], -row[3], row[0]))
    return rows


def report(name: str, rows: list[Row], total: tuple[float, ...]) -> str:
    lines = [
        f"{name}: {total[0]:.1f} tracked objects, {total[1]:,.0f} B (getsizeof), "
        f"{total[2]:.1f} referents per conn"
    ]
    lines.append(f"  {'objects':>7}  {'bytes':>11}  {'refs':>6}  type")
    for kind, count, size, refs in rows:
        lines.append(f"  {count:7.2f}  {size:9,.0f} B  {refs:6.2f}  {kind}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    n1 = args.n1 or (200 if args.quick else 2000)
    n2 = args.n2 or (400 if args.quick else 4000)
    if not 0 < n1 < n2:
        raise SystemExit("runtime_census.py: need 0 < --n1 < --n2")
    settle = args.settle if args.settle is not None else (1.0 if args.quick else 5.0)
    # Pings every 10 s (keepalive 30 s for MQTT), as runtime.py's connections.
    params = Params(n1, n2, 0, 0, 1.0, 10.0, 30, 0.0, settle, args.rate, 2, 30.0, 1)
    chosen = [c for c in CONTENDERS if c.python and (not args.only or c.name in args.only)]
    results: dict[str, Any] = {}
    with sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="keepconn-census-") as tmp:
        workdir = Path(tmp)
        user = ("census", "pw-census")
        account = Account(workdir / "users.txt", workdir / "users-clear.txt", user)
        write_users_file(account.users_file, [user])
        write_users_file(account.clear_users_file, [user], hashed=False)
        for c in chosen:
            started = time.monotonic()
            found = census(c, params, workdir, account)
            rows = per_connection(found, n2 - n1, args.min)
            total = tuple(
                (sum(v[i] for v in found["n2"].values()) - sum(v[i] for v in found["n1"].values()))
                / (n2 - n1)
                for i in (0, 1, 2)
            )
            print(report(c.name, rows, total), flush=True)
            print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
            results[c.name] = {
                "objects_per_conn": total[0],
                "getsizeof_per_conn": total[1],
                "referents_per_conn": total[2],
                "types": [
                    {"type": k, "objects": o, "bytes": b, "referents": r} for k, o, b, r in rows
                ],
            }
    if args.json is not None:
        write_json(args.json, {"benchmark": "runtime_census", "n1": n1, "n2": n2, **results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
