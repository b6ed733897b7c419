"""Tests of the sans-I/O core (keepconn._core): plain numbers for time, no sockets."""
