"""The anyio runtime: the server and its connections, on asyncio, uvloop and trio.

The adapter owns sockets, tasks and the clock, and does what the core decides:

* ``base``: what the server's and the client's connections share (framed reads, the send
  lock, the first-wins close reason, the ping loop, the RST-or-FIN close);
* ``connection``: the server's ``Connection``;
* ``server``: ``Server``, wiring the jobs below to its listeners;
* ``accept`` (the accept loop), ``life`` (one connection from accept to close), ``reaper``,
  ``shutdown``;
* ``failures``: which exception means which kind of end.
"""
