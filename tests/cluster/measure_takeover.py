"""Cross-node takeover latency on loopback, for docs/topics/cluster.md (not a test):

    flock /tmp/keepconn-bench.lock .venv/bin/python -m tests.cluster.measure_takeover \\
        --trials 1000 --backend asyncio|uvloop|trio

Three nodes on one throwaway redis-server; each trial connects a device to one node, then the
same identity to another, and times (1) the new hello until its OK (the claim's round trip
included) and (2) the new hello until the old connection's reset reaches the device.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import anyio

from keepconn.testing import RedisServer
from tests.cluster.nodes import cluster
from tests.lineapp import Client


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(trials: int) -> dict[str, float]:
    ok_times: list[float] = []
    reset_times: list[float] = []
    with RedisServer() as redis:
        async with cluster(redis) as nodes:
            for trial in range(trials):
                a, b = nodes[trial % 3], nodes[(trial + 1) % 3]
                old = await Client.connect(a.port)
                assert await old.hello(f"dev{trial}") == b"OK"
                new = await Client.connect(b.port)
                start = time.perf_counter()
                await new.send(f"HELLO dev{trial} secret".encode())
                async with anyio.create_task_group() as tasks:

                    async def wait_ok(new: Client = new, start: float = start) -> None:
                        assert await new.line() == b"OK"
                        ok_times.append(time.perf_counter() - start)

                    tasks.start_soon(wait_ok)
                    with anyio.fail_after(5):
                        try:
                            while await old.stream.receive():
                                pass
                        except (anyio.BrokenResourceError, anyio.EndOfStream):
                            reset_times.append(time.perf_counter() - start)
                await old.aclose()
                await new.aclose()
    ms = 1000.0
    return {
        "trials": trials,
        "ok_p50_ms": percentile(ok_times, 0.5) * ms,
        "ok_p99_ms": percentile(ok_times, 0.99) * ms,
        "reset_p50_ms": percentile(reset_times, 0.5) * ms,
        "reset_p99_ms": percentile(reset_times, 0.99) * ms,
        "reset_max_ms": max(reset_times) * ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--backend", choices=["asyncio", "uvloop", "trio"], default="asyncio")
    args = parser.parse_args()
    backend, options = (
        ("asyncio", {"use_uvloop": True}) if args.backend == "uvloop" else (args.backend, {})
    )
    result = anyio.run(measure, args.trials, backend=backend, backend_options=options)
    sys.stdout.write(json.dumps({"backend": args.backend, **result}) + "\n")


if __name__ == "__main__":
    main()
