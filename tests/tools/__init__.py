"""Tests of the command-line tools (keepconn._tools)."""
