"""The native transport on asyncio and uvloop: the server's plain TCP connections as asyncio
Protocols, under the same sans-I/O core and the same connection life as :mod:`keepconn._anyio`.

* ``connection``: ``NativeConnection``, a ``Connection`` fed by ``data_received``;
* ``stream``: the write-only anyio stream a ``refuse`` callback is given;
* ``listener``: the wrapper that hands accepted sockets to it, and when to use it;
* ``life``: ``NativeLifecycle``, the steps of a connection's life that differ on a bare task.
"""
