"""Cluster acceptance check (issue 12, "How it will be checked"): a black-box program that starts
a throwaway redis-server and three example gateways from the README's documented command
(``--cluster redis://127.0.0.1:PORT --node-id node-N --node-ttl 3``, each its own ``--port``,
``--data`` and ``--status-port``, a users file written by ``gateway.py passwd``, every other
option at its default: flapping detection is on), and drives raw MQTT 3.1.1 devices over them
while reading the kernel's socket table on every node's port:

a. cross-node takeover: CONNECT on node B of a device live on node A, until A's old socket is
   gone from A's table (p50/p99), and whether the old device socket saw a reset;
b. one winner among many concurrent CONNECTs of one client id spread over the nodes (the same
   id for several rounds, then a fresh id per round), and one device reconnecting 20 times
   over the nodes (past the flapping limit cluster-wide, not on any one node): exactly one
   ESTABLISHED socket cluster-wide afterwards, answering PINGREQ, every other closed or refused;
c. bad credentials on any node never evict the live session (CONNACK 4 / 5);
d. a SIGKILLed node: its devices get CONNACK 0 on the others at once; its lease key is gone
   within node_ttl;
e. Redis stalled 2 s (SIGSTOP/SIGCONT, ``DEBUG SLEEP 2``, ``CLIENT PAUSE 2000 WRITE``): nothing
   dropped, no double ownership, a device moving during the stall refused without losing its
   session;
f. Redis lost (SIGSTOP past the lease, then killed and restarted empty): every session closed
   with OWNERSHIP_LOST by node_ttl, new CONNECTs refused with CONNACK 3, all back afterwards.

Run ``flock /tmp/keepconn-bench.lock .venv/bin/python benchmarks/cluster_check.py [--json
PATH]`` (a few minutes), or ``--quick`` (fewer trials and devices, correctness only: the test
suite runs it). Exit status 0 when every check passed, 1 otherwise. Every process it starts is
ended by its pid in a ``finally``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cluster_check_faults import check_node_killed, check_store_lost, check_store_stalled
from cluster_check_nodes import Cluster
from cluster_check_takeover import (
    Outcome,
    check_bad_credentials,
    check_one_winner,
    check_takeover,
)
from harness import ROOT, grid, loadavg, machine, sigterm_as_exit, write_json

NODE_TTL = 3.0
CHECKS = "abcdef"


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts (the test suite's run)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--trials", type=int, help="takeover trials (a); 200, quick 30")
    p.add_argument("--concurrent", type=int, help="CONNECTs per round (b); 300, quick 60")
    p.add_argument("--rounds", type=int, help="rounds per kind (b); 5, quick 2")
    p.add_argument("--per-node", type=int, help="devices per node (d, e, f); 30, quick 8")
    p.add_argument("--only", default=CHECKS, help=f"which checks, e.g. 'ab' (default {CHECKS})")
    p.add_argument("--keep", type=Path, help="keep the nodes' logs in this folder")
    p.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for every node (e.g. --gateway-arg=--no-flapping, to compare)",
    )
    return p.parse_args(argv)


def _git_head() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip()[:100]
    except (OSError, subprocess.SubprocessError):
        return ""


def run(args: argparse.Namespace, work: Path) -> list[Outcome]:
    quick = args.quick
    trials = args.trials or (30 if quick else 200)
    concurrent = args.concurrent or (60 if quick else 300)
    rounds = args.rounds or (2 if quick else 5)
    per_node = args.per_node or (8 if quick else 30)
    tag = f"cc{int(time.time()) % 100000}"
    plan: list[tuple[str, Callable[[Cluster], Outcome]]] = [
        ("a", lambda c: check_takeover(c, trials, tag, strict_latency=not quick)),
        ("b", lambda c: check_one_winner(c, concurrent, rounds, tag)),
        ("c", lambda c: check_bad_credentials(c, 1 if quick else 3, tag)),
        ("e", lambda c: check_store_stalled(c, per_node, tag)),
        ("f", lambda c: check_store_lost(c, per_node, NODE_TTL, tag)),
        # Last: it leaves the cluster a node short.
        ("d", lambda c: check_node_killed(c, per_node, NODE_TTL, tag)),
    ]
    outcomes: list[Outcome] = []
    cluster = Cluster(work, extra=["--node-ttl", f"{NODE_TTL:g}", *args.gateway_arg])
    try:
        for name, check in plan:
            if name not in args.only:
                continue
            print(f"check {name} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                outcome = check(cluster)
            except Exception as exc:  # noqa: BLE001 - a crashed check is a failed check
                outcome = Outcome(name, "crashed")
                outcome.fail(f"{type(exc).__name__}: {exc}")
                outcome.figures["traceback"] = traceback.format_exc()
            outcome.figures["seconds"] = round(time.monotonic() - started, 1)
            dead = [n.name for n in cluster.nodes if not n.alive and name != "d"]
            if dead:
                outcome.fail(f"node(s) exited during the check: {dead}")
            outcomes.append(outcome)
            print(f"check {name}: {'PASS' if outcome.passed else 'FAIL'}", file=sys.stderr)
    finally:
        codes = cluster.stop()
    if outcomes:
        outcomes[-1].figures["node_exit_codes"] = codes
    return outcomes


def report(outcomes: list[Outcome]) -> str:
    body = [[o.name, o.title, "PASS" if o.passed else "FAIL", o.summary[:150]] for o in outcomes]
    lines = [grid(["check", "what", "result", "figures"], body)]
    for o in outcomes:
        for failure in o.failures[:12]:
            lines.append(f"  {o.name} FAIL: {failure[:600]}")
        if len(o.failures) > 12:
            lines.append(f"  {o.name}: ... {len(o.failures) - 12} more failures (see --json)")
        for note in o.notes[:6]:
            lines.append(f"  {o.name} NOTE: {note[:600]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    load_before = loadavg()
    commit = _git_head()
    with sigterm_as_exit():
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            outcomes = run(args, args.keep)
        else:
            with tempfile.TemporaryDirectory(prefix="keepconn-cluster-check-") as tmp:
                outcomes = run(args, Path(tmp))
    print(report(outcomes))
    if args.json is not None:
        data: dict[str, Any] = {
            "quick": args.quick,
            "commit": commit,
            "machine": machine(),
            "loadavg": {"before": load_before, "after": loadavg()},
            "node_ttl": NODE_TTL,
            "gateway_args": args.gateway_arg,
            "results": [o.as_json() for o in outcomes],
        }
        write_json(args.json, data)
    return 0 if outcomes and all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
