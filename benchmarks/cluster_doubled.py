"""The cluster benchmark's account of each doubled device (more than one ESTABLISHED socket over
all nodes after settling): which node held which socket, whether it was the device's live
connection or one it had abandoned, whether the gateway process owned the socket (accepted it)
or the kernel still held it in the listen queue, the device's connect attempts, its reboot
trial, and what the nodes' logs say about its connections (their close lines and reasons).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["describe", "process_inodes"]

#: Log lines kept per device and node (a device's few closes, not a flood).
LINES = 12


def process_inodes(pid: int) -> set[int]:
    """The socket inodes of process ``pid``'s descriptors (empty if it is gone)."""
    found = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def _log_lines(path: Path, client_id: str) -> list[str]:
    needle = f"'{client_id}'"
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            lines = [line.rstrip("\n") for line in f if needle in line]
    except OSError:
        return []
    return lines[:LINES]


def describe(
    sockets: Mapping[str, Sequence[dict[str, Any]]],
    history: Mapping[str, Any],
    trials: Sequence[dict[str, Any]],
    logs: Mapping[str, Path],
    limit: int = 20,
) -> list[dict[str, Any]]:
    """One record per doubled device (at most ``limit``): ``sockets`` are its ESTABLISHED
    server-side sockets as the census matched them, ``logs`` each node's log file by name
    (read after the nodes stopped, so every close is in them)."""
    by_id = {t["id"]: t for t in trials}
    out = []
    for client_id in sorted(sockets)[:limit]:
        out.append(
            {
                "id": client_id,
                "sockets": list(sockets[client_id]),
                "connects": history.get(client_id, []),
                "trial": by_id.get(client_id),
                "log": {name: _log_lines(path, client_id) for name, path in logs.items()},
            }
        )
    return out
