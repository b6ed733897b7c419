"""The native transport on trio: the server's plain TCP connections on keepconn's own socket
stream rather than anyio's, under the same Connection and the same life as :mod:`keepconn._anyio`.

* ``stream``: ``TrioStream``, an anyio ``SocketStream`` that is one slotted object over the
  stdlib socket;
* ``listener``: ``TrioListener``, which accepts on the stdlib socket and hands out those
  streams, and when a listener is served so.

Imported only on trio (trio is an optional dependency).
"""
