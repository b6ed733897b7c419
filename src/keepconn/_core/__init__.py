"""The sans-I/O core: every rule keepconn applies, and none of the I/O.

Nothing in this package imports anyio, trio, asyncio, socket, select, threading or time, nor
anything of keepconn outside it (a test reads the imports of every module here). Every method
that needs the time takes ``now`` (monotonic seconds) and says when it next needs a wake-up, so
each rule is tested with plain numbers and behaves the same on every event loop.

* ``registry``: sessions, their deadlines (a timing wheel) and reaping;
* ``opening``: the verdicts on a connection before its session opens (admission, bans,
  takeover);
* ``heartbeat``: server pings (``Pinger``) and the peer's ping rate (``PingPolicer``);
* ``admission``, ``flapping``, ``backoff``: storms, bans, and retry delays;
* ``framing``: bytes to frames;
* ``config``, ``events``, ``reasons``, ``errors``, ``validate``: the value types.
"""
