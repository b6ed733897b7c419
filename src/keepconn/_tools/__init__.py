"""The operator's tools: the ``keepconn`` command line and ``keepconn doctor``.

Built on the public namespaces (``keepconn.tcp``); nothing in the library imports these.
"""
