"""Tests of keepconn.testing: the namespace harness."""
