"""`make demo` until the device gateway lands: the registry alone, on a real clock.

Opens a few thousand sessions with mixed timeouts, keeps two thirds of them alive with touches,
takes some over, closes a few as "peer closed", and shows the rest being reaped on time.
"""

from __future__ import annotations

import random
import time

from keepconn import CloseReason, SessionRegistry


def main(sessions: int = 3000, seconds: float = 6.0) -> int:
    rng = random.Random(7)
    registry = SessionRegistry(timeout=2.0, resolution=0.1)
    start = time.monotonic()
    for i in range(sessions):
        # A third of the devices ask for a longer keepalive, as MQTT clients may.
        timeout = 3.0 if i % 3 == 0 else 2.0
        registry.open(f"device-{i}", now=start, timeout=timeout)
    alive = {f"device-{i}" for i in range(sessions) if i % 3 != 1}
    late_reaps = 0
    print(f"opened {sessions} sessions; {len(alive)} will heartbeat, the rest go silent")
    while (now := time.monotonic()) - start < seconds:
        for key in rng.sample(sorted(alive), k=min(len(alive), 400)):
            session = registry.get(key)
            if session is not None:
                session.touch(now)
        if rng.random() < 0.2:
            key = rng.choice(sorted(alive))
            registry.open(key, now=now)  # a rebooted device reconnects: takeover
        if rng.random() < 0.2 and alive:
            key = rng.choice(sorted(alive))
            alive.discard(key)
            session = registry.get(key)
            if session is not None:
                registry.close(session, CloseReason.PEER_CLOSED)
        for session in registry.reap(now, limit=10_000):
            alive.discard(session.key)
            if now > session.deadline + registry.resolution + 0.05:
                late_reaps += 1
        stats = registry.stats()
        reaped = stats.closed[CloseReason.IDLE_TIMEOUT]
        print(
            f"\rt={now - start:4.1f}s live={stats.live:5d} reaped={reaped:5d} "
            f"taken_over={stats.closed[CloseReason.TAKEN_OVER]:3d} "
            f"peer_closed={stats.closed[CloseReason.PEER_CLOSED]:3d}",
            end="",
            flush=True,
        )
        time.sleep(0.05)
    print()
    stats = registry.stats()
    print("closes by reason:")
    for reason, count in stats.closed.items():
        if count:
            print(f"  {reason.name:<16} {count}")
    print(f"live at the end: {stats.live}; reaped later than deadline + resolution: {late_reaps}")
    return 0 if late_reaps == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
