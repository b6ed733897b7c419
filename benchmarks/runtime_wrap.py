"""Start the example gateway or the naive gateway from its own ``main()``, with the runtime
benchmark's probe (benchmarks/runtime_probe.py) inside the process::

    python benchmarks/runtime_wrap.py gateway ARGS...   # device_gateway.gateway:main(ARGS)
    python benchmarks/runtime_wrap.py naive ARGS...     # naive_gateway.main(ARGS)

ARGS are the server's own command line, passed through untouched, so the server runs with the
options it would have from its documented command. The control thread starts before ``main()``
(its port comes from the environment, see runtime_probe.CONTROL_ENV). The loop-lag task must
run on the server's own event loop, which only exists inside ``main()``: both ``main()``
functions look their module's ``run`` coroutine up when they call it, so this wrapper puts a
``run`` there that starts the lag task next to the original one, and nothing else changes.
Nothing of this lives in the gateway: it is the benchmark's instrument.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable

import anyio

import runtime_probe


def _anyio_probed(
    run: Callable[[argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], Awaitable[int]]:
    # The gateway runs on asyncio, uvloop or trio (its --backend): the lag task is anyio's,
    # sleeping with the loop's own sleep (see runtime_probe.loop_sleep).
    async def run_probed(args: argparse.Namespace) -> int:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(runtime_probe.lag_loop, runtime_probe.loop_sleep())
            try:
                return await run(args)
            finally:
                tasks.cancel_scope.cancel()

    return run_probed


def _asyncio_probed(
    run: Callable[[argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], Awaitable[int]]:
    # The naive gateway is plain asyncio (and cancels every other task when it stops).
    async def run_probed(args: argparse.Namespace) -> int:
        lag = asyncio.create_task(runtime_probe.lag_loop(asyncio.sleep))
        try:
            return await run(args)
        finally:
            lag.cancel()

    return run_probed


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("gateway", "naive"):
        print("usage: runtime_wrap.py gateway|naive ARGS...", file=sys.stderr)
        return 2
    which, argv = sys.argv[1], sys.argv[2:]
    runtime_probe.start_from_env()
    if which == "gateway":
        from device_gateway import gateway

        gateway.run = _anyio_probed(gateway.run)  # type: ignore[assignment]
        return gateway.main(argv)
    import naive_gateway

    naive_gateway.run = _asyncio_probed(naive_gateway.run)  # type: ignore[assignment]
    return naive_gateway.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
