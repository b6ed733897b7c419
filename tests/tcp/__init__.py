"""Tests of keepconn.tcp: socket options, TCP_INFO, the census, real kernel faults."""
