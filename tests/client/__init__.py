"""Tests of keepconn.client."""
