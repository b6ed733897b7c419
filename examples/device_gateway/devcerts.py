"""Throwaway certificates for trying the gateway over TLS, made with the ``openssl`` command::

    python -m device_gateway.devcerts DIR [--name 127.0.0.1 --name localhost] [--client alice]

writes ``DIR/ca.pem`` (the CA devices trust), ``DIR/server.pem`` and ``DIR/server.key`` (for
``--tls-cert`` and ``--tls-key``; valid for every ``--name``, IP addresses and DNS names alike)
and ``DIR/<client>.pem``/``.key`` for each ``--client`` (CN = the name: the user, with
``--require-client-cert``). EC P-256 keys, valid for 30 days. ``fleet.py --spawn-gateway
--tls`` makes its own this way.

For development only: the CA's key sits unencrypted beside the certificates it signed.
"""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import subprocess
from collections.abc import Sequence
from pathlib import Path

import attrs

__all__ = ["DevPki", "make_dev_pki"]

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@attrs.frozen
class DevPki:
    """The files :func:`make_dev_pki` wrote."""

    ca: Path
    server_cert: Path
    server_key: Path
    #: Client name -> (certificate, key).
    clients: dict[str, tuple[Path, Path]]


def _openssl(where: Path, *args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=where, check=True, capture_output=True)


def _issue(where: Path, name: str, cn: str, extensions: list[str], days: int) -> None:
    _openssl(where, "req", "-new", *_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}")  # fmt: skip
    ext = where / f"{name}.ext"
    ext.write_text("\n".join(["[leaf]", *extensions]) + "\n")
    _openssl(where, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-set_serial", f"0x{secrets.token_hex(8)}", "-days", str(days),
             "-extfile", ext, "-extensions", "leaf", "-out", f"{name}.pem")  # fmt: skip
    (where / f"{name}.csr").unlink()
    ext.unlink()


def make_dev_pki(
    where: Path,
    names: Sequence[str] = ("127.0.0.1", "localhost"),
    clients: Sequence[str] = (),
    days: int = 30,
) -> DevPki:
    """Make a CA, a server certificate for ``names`` and one client certificate per name in
    ``clients``, in ``where`` (created if missing)."""
    where.mkdir(parents=True, exist_ok=True)
    _openssl(where, "req", "-x509", "-new", *_KEY, "-keyout", "ca.key", "-out", "ca.pem",
             "-subj", "/CN=device gateway development CA", "-days", str(days),
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    common = [
        "basicConstraints = critical,CA:FALSE",
        "keyUsage = critical,digitalSignature",
        "subjectKeyIdentifier = hash",
        "authorityKeyIdentifier = keyid",
    ]
    alt = ",".join(f"{'IP' if _is_address(n) else 'DNS'}:{n}" for n in names)
    _issue(
        where,
        "server",
        names[0],
        [*common, "extendedKeyUsage = serverAuth", f"subjectAltName = {alt}"],
        days,
    )
    made = {}
    for client in clients:
        _issue(where, client, client, [*common, "extendedKeyUsage = clientAuth"], days)
        made[client] = (where / f"{client}.pem", where / f"{client}.key")
    return DevPki(where / "ca.pem", where / "server.pem", where / "server.key", made)


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (module docstring)."""
    p = argparse.ArgumentParser(prog="python -m device_gateway.devcerts", description=__doc__)
    p.add_argument("dir", type=Path)
    p.add_argument("--name", action="append", help="server address or DNS name (repeatable)")
    p.add_argument("--client", action="append", default=[], help="client certificate CN")
    args = p.parse_args(argv)
    pki = make_dev_pki(args.dir, args.name or ("127.0.0.1", "localhost"), args.client)
    print(f"CA (for devices):        {pki.ca}")
    print(f"--tls-cert / --tls-key:  {pki.server_cert} {pki.server_key}")
    for client, (cert, key) in pki.clients.items():
        print(f"client {client}:  {cert} {key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
