"""keepconn's test suite."""
