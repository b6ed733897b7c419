"""Which of the sessions the server dropped under a live device are false reaps.

A device counts a drop when the server closes a session the device had not walked away from
(storm_devices.py). That is a false reap only if the device kept the session alive on its
schedule. Each drop is set beside the gateway's own record of that connection (storm_wrap.py's
trace, matched by the device's address and port) and classified:

* ``device_stalled``: the server closed it for silence (IDLE_TIMEOUT, HEARTBEAT_TIMEOUT,
  KEEPALIVE_TIMEOUT), the device had in fact sent nothing for at least the server's timeout
  (1.5 x keepalive) when it was closed, and the device's own worker loop was stalled for at
  least half the keepalive's margin (the timeout less the keepalive) in that session's life,
  which is how a device that meant to ping on time sends late. The server was right.
* ``false_reap``: anything else. The close reason, its detail and the device's schedule are
  kept with it, so a false reap can be read, not just counted.

Where the gateway left no trace (the naive gateway has none, or the gateway did not exit
cleanly) every drop stays a false reap: no evidence, no excuse.
"""

from __future__ import annotations

from typing import Any

SILENCE_REASONS = ("IDLE_TIMEOUT", "HEARTBEAT_TIMEOUT", "KEEPALIVE_TIMEOUT")


def _by(key: str, events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        out.setdefault(event.get(key, ""), []).append(event)
    return out


def _last_before(events: list[dict[str, Any]], kind: str, t: float) -> dict[str, Any] | None:
    found = None
    for event in events:
        if event["kind"] == kind and event["t"] <= t:
            found = event
    return found


def classify(
    drops: list[dict[str, Any]], trace: dict[str, Any] | None, keepalive: float, cut: float
) -> dict[str, Any]:
    """Counts by class and every drop with its evidence (times relative to the cut)."""
    timeout = 1.5 * keepalive
    margin = timeout - keepalive
    events = trace["events"] if trace else []
    peers, clients = _by("peer", events), _by("client_id", events)
    rows = []
    for drop in drops:
        lost_at = drop["lost_at"] if drop["lost_at"] is not None else float("inf")
        # An address and port come back in later connections: only this one's life counts.
        born = drop["hello_sent_at"] or drop["connack_at"] or 0.0
        mine = [e for e in peers.get(drop["local"], []) if e["t"] >= born - 0.1]
        # The server's close comes before the device sees it (allow for clock-read order).
        closed = _last_before(mine, "closed", lost_at + 1.0)
        opened = _last_before(mine, "opened", lost_at + 1.0)
        reaped = _last_before(mine, "reaped", lost_at + 1.0)
        sends = [drop["hello_sent_at"], *(sent for _, sent in drop["pings"])]
        close_t = closed["t"] if closed else lost_at
        before = [s for s in sends if s is not None and s <= close_t]
        silence = close_t - max(before) if before else None
        late = [sent - due for due, sent in drop["pings"]]
        verdict = "false_reap"
        if (
            closed is not None
            and closed["reason"] in SILENCE_REASONS
            and silence is not None
            and silence >= timeout
            and drop["worker_lag_max"] >= margin / 2
        ):
            verdict = "device_stalled"

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - cut, 3)

        rows.append(
            {
                "verdict": verdict,
                "client_id": drop["client_id"],
                "local": drop["local"],
                "server_reason": None if closed is None else closed["reason"],
                "server_detail": None if closed is None else closed["detail"],
                "server_opened": rel(opened["t"]) if opened else None,
                "server_closed": rel(closed["t"]) if closed else None,
                "reap_lateness": reaped["lateness"] if reaped else None,
                "device_hello_sent": rel(drop["hello_sent_at"]),
                "device_connack": rel(drop["connack_at"]),
                "device_pings": [[rel(d), rel(s)] for d, s in drop["pings"]],
                "device_lost": rel(drop["lost_at"]),
                "device_lost_by": drop["lost_by"],
                "device_silence_at_close": None if silence is None else round(silence, 3),
                "ping_lateness_max": round(max(late), 3) if late else None,
                "worker_lag_max": drop["worker_lag_max"],
                # Both sides' stories of this device since the cut: its attempts (started,
                # local address, stage reached, outcome, ended) and the server's events for
                # its client id, on every connection.
                "device_attempts": [
                    [rel(a[0]), a[1], a[2], a[3], rel(a[4])] for a in drop.get("history", [])
                ],
                "server_events": [
                    {**e, "t": rel(e["t"])}
                    for e in clients.get(drop["client_id"], [])
                    if e["t"] >= cut - 1.0
                ],
            }
        )
    return {
        "false_reaps": sum(r["verdict"] == "false_reap" for r in rows),
        "device_stalled": sum(r["verdict"] == "device_stalled" for r in rows),
        "traced": trace is not None,
        "drops": rows,
    }
