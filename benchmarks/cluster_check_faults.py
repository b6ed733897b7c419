"""Checks d, e and f of the cluster acceptance check: a SIGKILLed node, a stalled Redis and a
lost Redis.

Each starts its own fleet of raw MQTT devices, spread over the live nodes, with fresh client
ids, and returns an :class:`~cluster_check_takeover.Outcome`.
"""

from __future__ import annotations

import selectors
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from cluster_check_nodes import PASSWORD, USER, Cluster
from cluster_check_takeover import Outcome, cluster_established, ms, owner_of
from cluster_check_wire import Device, redis_command, redis_send, slack
from harness import quantile

__all__ = ["check_node_killed", "check_store_lost", "check_store_stalled"]


def _fleet(cluster: Cluster, count: int, prefix: str, out: Outcome) -> list[tuple[str, Device]]:
    """``count`` devices online, device i on live node i % nodes."""
    nodes = cluster.live_nodes()
    fleet = []
    for i in range(count):
        cid = f"{prefix}-{i}"
        d = Device(nodes[i % len(nodes)].port)
        code = d.hello(cid, USER, PASSWORD)
        if code != 0:
            out.fail(f"{cid} on {nodes[i % len(nodes)].name}: CONNACK {code} at the start")
        fleet.append((cid, d))
    return fleet


def _close_all(fleet: list[tuple[str, Device]]) -> None:
    for _, d in fleet:
        d.close()


def _watch_closes(fleet: list[tuple[str, Device]], t0: float, until: float) -> dict[str, Any]:
    """Wait up to ``until`` (monotonic) for the gateway to end each device's connection;
    client id -> (seconds after ``t0``, "reset"/"eof") for those it ended."""
    sel = selectors.DefaultSelector()
    for cid, d in fleet:
        sel.register(d.sock, selectors.EVENT_READ, cid)
    ended: dict[str, Any] = {}
    while len(ended) < len(fleet) and time.monotonic() < until:
        for key, _ in sel.select(0.01):
            sock = key.fileobj
            try:
                how = "data" if sock.recv(4096) else "eof"  # type: ignore[union-attr]
            except ConnectionResetError:
                how = "reset"
            ended[key.data] = (time.monotonic() - t0, how)
            sel.unregister(sock)
    sel.close()
    return ended


def _double_owned(cluster: Cluster, fleet: list[tuple[str, Device]]) -> list[str]:
    """Devices with other than one ESTABLISHED socket cluster-wide, or whose store record
    names another node than the one holding the socket."""
    table = cluster_established(cluster)
    problems = []
    for cid, d in fleet:
        node = table.where(d)
        if node is None:
            problems.append(f"{cid}: no ESTABLISHED socket cluster-wide")
            continue
        owner = owner_of(cluster, cid)
        if owner != node:
            problems.append(f"{cid}: socket on {node}, store names {owner}")
    return problems


# ----------------------------------------------------------------------------------------------
# d. A SIGKILLed node.


def _lease_key(cluster: Cluster, node_name: str) -> str | None:
    keys = redis_command(cluster.redis.port, "KEYS", f"*:node:{node_name}")
    return str(keys[0]) if isinstance(keys, list) and keys else None


def check_node_killed(cluster: Cluster, per_node: int, node_ttl: float, tag: str) -> Outcome:
    """SIGKILL the last node: its devices see their connection end, reconnect to the other
    nodes and get CONNACK 0 at once; its lease key is gone within node_ttl."""
    out = Outcome("d", "SIGKILLed node")
    victim = cluster.nodes[-1]
    others = [n for n in cluster.nodes if n is not victim]
    fleet = _fleet(cluster, per_node * len(cluster.nodes), f"{tag}-d", out)
    moved: list[Device] = []
    try:
        lease = _lease_key(cluster, victim.name)
        if lease is None:
            out.fail(f"no lease key *:node:{victim.name} in the store before the kill")
            return out
        pttl_before = redis_command(cluster.redis.port, "PTTL", lease)
        theirs = [(cid, d) for cid, d in fleet if d.node_port == victim.port]
        t0 = time.monotonic()
        victim.kill()
        ended = _watch_closes(theirs, t0, t0 + 5.0)
        reconnect: list[float] = []
        codes: Counter[str] = Counter()
        for i, (cid, _) in enumerate(theirs):
            node = others[i % len(others)]
            d = Device(node.port)
            moved.append(d)
            code = d.hello(cid, USER, PASSWORD)
            codes[str(code)] += 1
            reconnect.append(time.monotonic() - d.connect_sent_at)
            if code != 0:
                out.fail(f"{cid}: CONNACK {code} on {node.name} after {victim.name} died")
        gone_after = None
        while time.monotonic() - t0 < node_ttl + 3.0:
            if not redis_command(cluster.redis.port, "EXISTS", lease):
                gone_after = time.monotonic() - t0
                break
            time.sleep(0.02)
        if gone_after is None or gone_after > node_ttl + slack(0.1):
            out.fail(f"lease {lease} gone after {gone_after} s (node_ttl {node_ttl:g} s)")
        missed = [cid for cid, _ in theirs if cid not in ended]
        if missed:
            out.fail(f"{len(missed)} devices of {victim.name} saw no close within 5 s")
        slow = [r for r in reconnect if r > slack(1.0)]
        if slow:
            out.fail(f"{len(slow)} reconnects took over 1 s to CONNACK (max {max(slow):.3f} s)")
        survivors = [(cid, d) for cid, d in fleet if d.node_port != victim.port]
        survivors += [(cid, d) for (cid, _), d in zip(theirs, moved, strict=True)]
        for p in _double_owned(cluster, survivors):
            out.fail(p)
        out.figures = {
            "devices_on_victim": len(theirs),
            "connection_end": dict(Counter(how for _, how in ended.values())),
            "reconnect_connack": dict(codes),
            "reconnect_ms": {
                "p50": ms(quantile(reconnect, 0.5)),
                "max": ms(max(reconnect, default=None)),
            },
            "lease_pttl_before_ms": pttl_before,
            "lease_gone_s": None if gone_after is None else round(gone_after, 3),
            "node_ttl": node_ttl,
        }
        out.summary = (
            f"{len(theirs)} moved: CONNACK {dict(codes)}, max "
            f"{out.figures['reconnect_ms']['max']} ms; lease gone after "
            f"{out.figures['lease_gone_s']} s"
        )
        return out
    finally:
        _close_all(fleet)
        for d in moved:
            d.close()


# ----------------------------------------------------------------------------------------------
# e. Redis stalled.


def _stall_sigstop(cluster: Cluster, seconds: float) -> Callable[[], None]:
    cluster.redis.pause()
    return cluster.redis.resume


def _stall_debug_sleep(cluster: Cluster, seconds: float) -> Callable[[], None]:
    conn = redis_send(cluster.redis.port, "DEBUG", "SLEEP", f"{seconds:g}", timeout=seconds + 5)

    def done() -> None:
        try:
            conn.recv(64)  # +OK once it wakes
        finally:
            conn.close()

    return done


def _stall_client_pause(cluster: Cluster, seconds: float) -> Callable[[], None]:
    # Redis answers the PAUSE itself at once and then holds every write command (and every
    # script, which may write) of every client for the given milliseconds.
    redis_command(cluster.redis.port, "CLIENT", "PAUSE", str(int(seconds * 1000)), "WRITE")
    return lambda: None


def check_store_stalled(cluster: Cluster, per_node: int, tag: str) -> Outcome:
    """Redis stalled 2 s (SIGSTOP, ``DEBUG SLEEP 2``, ``CLIENT PAUSE 2000 WRITE``): no session
    dropped, every device
    still answers PINGREQ, one socket each cluster-wide, the store naming its node; a device
    that moves to another node during the stall is refused there and keeps its session."""
    out = Outcome("e", "Redis stalled 2 s")
    out.figures = {}
    stalls = (
        ("SIGSTOP", _stall_sigstop),
        ("DEBUG SLEEP", _stall_debug_sleep),
        ("CLIENT PAUSE WRITE", _stall_client_pause),
    )
    for how, stall in stalls:
        prefix = f"{tag}-e-{how.split()[0].lower()}"
        fleet = _fleet(cluster, per_node * len(cluster.live_nodes()), prefix, out)
        mover: Device | None = None
        try:
            t0 = time.monotonic()
            end_stall = stall(cluster, 2.0)
            time.sleep(0.3)
            # During the stall: the first device tries to move to another node.
            cid0, d0 = fleet[0]
            target = next(n for n in cluster.live_nodes() if n.port != d0.node_port)
            mover = Device(target.port)
            move_code = mover.hello(cid0, USER, PASSWORD, timeout=3.0)
            move_s = time.monotonic() - mover.connect_sent_at
            fresh = Device(target.port)
            fresh_code = fresh.hello(f"{prefix}-fresh", USER, PASSWORD, timeout=3.0)
            fresh.close()
            dead_during = []
            while time.monotonic() - t0 < 1.9:
                dead_during += [cid for cid, d in fleet if not d.ping(1.0)]
                time.sleep(0.2)
            time.sleep(max(0.0, 2.0 - (time.monotonic() - t0)))
            end_stall()
            time.sleep(1.5)  # the nodes catch up with the store
            dead_after = [cid for cid, d in fleet if not d.ping(2.0)]
            doubled = _double_owned(cluster, fleet)
            mover_open = move_code == 0 or mover.wait_closed(0.5) is None
            out.figures[how] = {
                "devices": len(fleet),
                "move_during_stall_connack": move_code,
                "move_answer_ms": ms(move_s),
                "new_device_during_stall_connack": fresh_code,
                "no_pingresp_during": sorted(set(dead_during)),
                "no_pingresp_after": dead_after,
                "ownership_problems": doubled,
            }
            if dead_during or dead_after:
                out.fail(f"{how}: sessions dropped: during {set(dead_during)}, after {dead_after}")
            if move_code == 0:
                out.fail(f"{how}: {cid0} moved to {target.name} during the stall got CONNACK 0")
            if mover_open and move_code != 0:
                out.fail(f"{how}: refused mover's connection left open")
            if fresh_code == 0:
                out.fail(f"{how}: a new CONNECT during the stall got CONNACK 0")
            for p in doubled:
                out.fail(f"{how}: {p}")
        finally:
            _close_all(fleet)
            if mover is not None:
                mover.close()
    out.summary = "; ".join(
        f"{how}: move->{f['move_during_stall_connack']}, new->"
        f"{f['new_device_during_stall_connack']}, dropped "
        f"{len(f['no_pingresp_after'])}, ownership problems {len(f['ownership_problems'])}"
        for how, f in out.figures.items()
    )
    return out


# ----------------------------------------------------------------------------------------------
# f. Redis lost.


def _back(cluster: Cluster, cid: str, node_port: int, within: float) -> tuple[Device | None, float]:
    """Retry a CONNECT every 0.1 s until CONNACK 0 (the device, and when) or ``within``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        d = Device(node_port)
        if d.hello(cid, USER, PASSWORD, timeout=3.0) == 0:
            return d, time.monotonic() - t0
        d.close()
        time.sleep(0.1)
    return None, within


def check_store_lost(cluster: Cluster, per_node: int, node_ttl: float, tag: str) -> Outcome:
    """Redis gone longer than the lease (SIGSTOP for node_ttl + 2 s, then killed and restarted
    empty after as long): every session closed (OWNERSHIP_LOST in the nodes' close lines) by
    node_ttl, new CONNECTs refused with CONNACK 3, every device back afterwards."""
    out = Outcome("f", "Redis lost")
    outage = node_ttl + 2.0
    for how in ("SIGSTOP", "killed"):
        fleet = _fleet(cluster, per_node * len(cluster.live_nodes()), f"{tag}-f-{how}", out)
        back: list[Device] = []
        try:
            marks = {n.name: n.mark() for n in cluster.live_nodes()}
            t0 = time.monotonic()
            if how == "SIGSTOP":
                cluster.redis.pause()
            else:
                cluster.redis.stop()
            probe_at = t0 + 1.0
            ended = _watch_closes(fleet, t0, probe_at)
            first = Device(cluster.live_nodes()[0].port)
            early_code = first.hello(f"{tag}-f-{how}-new1", USER, PASSWORD, timeout=3.0)
            first.close()
            ended.update(_watch_closes([f for f in fleet if f[0] not in ended], t0, t0 + outage))
            late = Device(cluster.live_nodes()[-1].port)
            late_code = late.hello(f"{tag}-f-{how}-new2", USER, PASSWORD, timeout=3.0)
            late.close()
            table = cluster_established(cluster)
            still = [cid for cid, d in fleet if d in table]
            time.sleep(max(0.0, outage - (time.monotonic() - t0)))
            t_back = time.monotonic()
            if how == "SIGSTOP":
                cluster.redis.resume()
            else:
                cluster.redis.start()
            times = []
            for cid, d in fleet:
                nd, took = _back(cluster, cid, d.node_port, within=10.0)
                if nd is None:
                    out.fail(f"{how}: {cid} not back on its node 10 s after Redis returned")
                else:
                    back.append(nd)
                    times.append(took)
            back_after = time.monotonic() - t_back
            time.sleep(0.3)
            lost = {
                n.name: n.closes(
                    {d.port for _, d in fleet if d.node_port == n.port}, marks[n.name]
                )["OWNERSHIP_LOST"]
                for n in cluster.live_nodes()
            }
            closed_at = sorted(t for t, _ in ended.values())
            out.figures[how] = {
                "devices": len(fleet),
                "closed": len(ended),
                "closed_first_s": round(closed_at[0], 3) if closed_at else None,
                "closed_last_s": round(closed_at[-1], 3) if closed_at else None,
                "ownership_lost_in_logs": lost,
                "established_at_outage_end": len(still),
                "connack_new_at_1s": early_code,
                "connack_new_after_closes": late_code,
                "all_back_within_s": round(back_after, 3),
                "first_retry_ok_s": round(min(times), 3) if times else None,
            }
            if len(ended) < len(fleet) or still:
                out.fail(f"{how}: {len(fleet) - len(ended)} sessions not closed; {still} open")
            if closed_at and closed_at[-1] > node_ttl + slack(0.3):
                out.fail(f"{how}: last session closed {closed_at[-1]:.3f} s after (ttl {node_ttl})")
            if sum(lost.values()) != len(fleet):
                out.fail(f"{how}: OWNERSHIP_LOST close lines {lost}, want {len(fleet)} in all")
            if early_code != 3 or late_code != 3:
                out.fail(f"{how}: new CONNECTs while Redis was gone got {early_code}, {late_code}")
        finally:
            if not cluster.redis.running:
                cluster.redis.start()
            elif how == "SIGSTOP":
                cluster.redis.resume()
            _close_all(fleet)
            for d in back:
                d.close()
        cluster.wait_healthy()
    out.summary = "; ".join(
        f"{how}: {f['closed']}/{f['devices']} closed by {f['closed_last_s']} s, "
        f"OWNERSHIP_LOST {sum(f['ownership_lost_in_logs'].values())}, new CONNACK "
        f"{f['connack_new_at_1s']}/{f['connack_new_after_closes']}, "
        f"back in {f['all_back_within_s']} s"
        for how, f in out.figures.items()
    )
    return out
