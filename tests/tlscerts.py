"""Certificates for the TLS tests, made with the ``openssl`` command in a temporary directory.

One test CA signs a server certificate for 127.0.0.1 and localhost (subjectAltName, as clients
check it) and client certificates; the bad ones are made the way they occur in the field: an
expired server certificate, one for another host name, and a server and a client certificate
from a CA nobody trusts. EC P-256 keys: quick to make, and the handshakes stay cheap.
"""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import subprocess
from pathlib import Path

import attrs
import pytest

from keepconn.testing.pytest_plugin import REQUIRE_ENV

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@attrs.frozen
class Pair:
    """A certificate and its key (PEM files)."""

    cert: Path
    key: Path


@attrs.frozen
class Pki:
    """Everything the TLS tests need, in one directory."""

    dir: Path
    #: The CA the tests trust.
    ca: Path
    #: For 127.0.0.1 and localhost, by the trusted CA.
    server: Pair
    #: CN=alice and CN=bob, by the trusted CA (clientAuth).
    alice: Pair
    bob: Pair
    #: Expired yesterday, otherwise like ``server``.
    expired_server: Pair
    #: Valid, by the trusted CA, but only for other.example.
    wrong_host_server: Pair
    #: For 127.0.0.1, by a CA nobody trusts.
    rogue_server: Pair
    #: CN=alice, by the CA nobody trusts.
    rogue_alice: Pair
    #: CN=alice, expired.
    expired_alice: Pair

    def server_context(self, pair: Pair | None = None, clients: str = "none") -> ssl.SSLContext:
        """A server context with ``pair`` (default: the good server certificate); ``clients``
        is "none", "optional" or "required" client certificates from the trusted CA."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        chosen = pair if pair is not None else self.server
        context.load_cert_chain(chosen.cert, chosen.key)
        if clients != "none":
            context.load_verify_locations(self.ca)
            context.verify_mode = ssl.CERT_OPTIONAL if clients == "optional" else ssl.CERT_REQUIRED
        return context

    def client_context(self, pair: Pair | None = None) -> ssl.SSLContext:
        """A client context trusting the test CA, presenting ``pair`` if given."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if pair is not None:
            context.load_cert_chain(pair.cert, pair.key)
        return context


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True, timeout=30
    )


def _ca(where: Path, name: str) -> Pair:
    pair = Pair(where / f"{name}.pem", where / f"{name}.key")
    _openssl(
        "req", "-x509", "-new", *_KEY, "-keyout", pair.key, "-out", pair.cert,
        "-subj", f"/CN=keepconn test {name}", "-days", "30",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=where,
    )  # fmt: skip
    return pair


def _leaf(
    where: Path,
    ca: Pair,
    name: str,
    cn: str,
    *,
    usage: str,
    names: str | None = None,
    days: int = 30,
) -> Pair:
    pair = Pair(where / f"{name}.pem", where / f"{name}.key")
    csr = where / f"{name}.csr"
    _openssl(
        "req", "-new", *_KEY, "-keyout", pair.key, "-out", csr, "-subj", f"/CN={cn}", cwd=where
    )
    lines = [
        "[leaf]",
        "basicConstraints = critical,CA:FALSE",
        "keyUsage = critical,digitalSignature",
        f"extendedKeyUsage = {usage}",
        "subjectKeyIdentifier = hash",
        "authorityKeyIdentifier = keyid",
    ]
    if names is not None:
        lines.append(f"subjectAltName = {names}")
    ext = where / f"{name}.ext"
    ext.write_text("\n".join(lines) + "\n")
    # A negative -days gives a certificate that expired that many days ago (OpenSSL 3.0 has no
    # -not_after): exactly what a device with a stale certificate presents.
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key,
        "-set_serial", f"0x{secrets.token_hex(8)}", "-days", str(days),
        "-extfile", ext, "-extensions", "leaf", "-out", pair.cert,
        cwd=where,
    )  # fmt: skip
    return pair


def make_pki(where: Path) -> Pki:
    """Make the test CA, the rogue CA and every certificate in ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    ca, rogue = _ca(where, "ca"), _ca(where, "rogue-ca")
    local = "IP:127.0.0.1,DNS:localhost"
    return Pki(
        dir=where,
        ca=ca.cert,
        server=_leaf(where, ca, "server", "localhost", usage="serverAuth", names=local),
        alice=_leaf(where, ca, "alice", "alice", usage="clientAuth"),
        bob=_leaf(where, ca, "bob", "bob", usage="clientAuth"),
        expired_server=_leaf(
            where, ca, "expired-server", "localhost", usage="serverAuth", names=local, days=-1
        ),
        wrong_host_server=_leaf(
            where,
            ca,
            "other-server",
            "other.example",
            usage="serverAuth",
            names="DNS:other.example",
        ),
        rogue_server=_leaf(
            where, rogue, "rogue-server", "localhost", usage="serverAuth", names=local
        ),
        rogue_alice=_leaf(where, rogue, "rogue-alice", "alice", usage="clientAuth"),
        expired_alice=_leaf(where, ca, "expired-alice", "alice", usage="clientAuth", days=-1),
    )


def require_openssl() -> None:
    """Skip without the openssl command, unless every test must run (CI, or root who can
    install it with `make setup`)."""
    if shutil.which("openssl") is not None:
        return
    why = "the openssl command is not installed; `make setup` installs it (as root, with apt)"
    if os.geteuid() == 0 or os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(why)
    pytest.skip(why)
