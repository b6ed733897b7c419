"""Tests of the anyio runtime (keepconn._anyio) on real loopback sockets and in namespaces."""
