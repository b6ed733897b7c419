"""The gateway's users: a file of ``username:scrypt$...`` lines, checked in constant time, and
the ``passwd`` command that writes it (``python gateway.py passwd USERS_FILE USERNAME``, in the
manner of mosquitto_passwd).

An entry is ``username:scrypt$n=16384,r=8,p=1$<salt>$<hash>``: the standard library's scrypt
with a random 16-byte salt, its cost parameters kept in the entry so they can be raised later
without invalidating the old ones, salt and hash in unpadded URL-safe base64. A line whose
secret has no recognised prefix is a clear-text password: refused when the file is loaded,
unless the operator asks for it (``--allow-plaintext-users``), since anyone who can read such
a file can log in as everyone in it.

scrypt is slow on purpose (some 35 ms and 16 MiB for the default parameters), which a gateway
cannot pay on every CONNECT of a reconnect storm. So the slow check runs in a worker thread,
one at a time, and a success is remembered: as an HMAC of the password under a key made at
start-up and never stored, so what stays in memory is neither the password nor anything an
attacker could test guesses against offline. The next CONNECT of that user with that password
costs microseconds; any other password takes the full scrypt again, as does an unknown user
(against a dummy entry), so a failure takes the same time whoever it is for.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import os
import re
import secrets
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
import attrs

__all__ = ["ScryptHash", "Users", "UsersFileError", "hash_password", "passwd_main"]

#: What an entry's secret starts with when it is a hash this module knows.
PREFIX = "scrypt$"
#: The scrypt paper's parameters for interactive logins: 16 MiB and tens of milliseconds.
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2**14, 8, 1
_SALT_BYTES, _KEY_BYTES = 16, 32
_PARAMS = re.compile(r"n=(\d+),r=(\d+),p=(\d+)")
#: The command that converts a clear-text file, for the error that asks for it.
CONVERT_HINT = "python examples/device_gateway/gateway.py passwd -U {path}"


class UsersFileError(ValueError):
    """The users file cannot be used; the message names the file and line."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@attrs.frozen
class ScryptHash:
    """One stored password: scrypt's parameters, the salt and the derived key."""

    n: int
    r: int
    p: int
    salt: bytes
    key: bytes = attrs.field(repr=False)

    @classmethod
    def of(
        cls, password: bytes, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P
    ) -> ScryptHash:
        """Hash ``password`` with a fresh random salt."""
        salt = secrets.token_bytes(_SALT_BYTES)
        return cls(n, r, p, salt, _derive(password, salt, n, r, p))

    @classmethod
    def parse(cls, text: str) -> ScryptHash:
        """Read ``scrypt$n=..,r=..,p=..$salt$hash``; ValueError saying what is wrong."""
        parts = text.split("$")
        if len(parts) != 4 or parts[0] != PREFIX.rstrip("$"):
            raise ValueError("expected scrypt$n=N,r=R,p=P$salt$hash")
        match = _PARAMS.fullmatch(parts[1])
        if match is None:
            raise ValueError(f"bad scrypt parameters {parts[1]!r} (expected n=N,r=R,p=P)")
        n, r, p = (int(x) for x in match.groups())
        # Bounded, so that a mistyped entry cannot make one check take minutes or gigabytes.
        if n < 2 or n & (n - 1) or n > 2**20 or not 1 <= r <= 32 or not 1 <= p <= 16:
            raise ValueError(f"scrypt parameters out of range: n={n} r={r} p={p}")
        try:
            salt, key = _unb64(parts[2]), _unb64(parts[3])
        except ValueError:
            raise ValueError("salt or hash is not base64") from None
        if not salt or len(key) < 16:
            raise ValueError("salt or hash too short")
        return cls(n, r, p, salt, key)

    def verify(self, password: bytes) -> bool:
        """Whether ``password`` is the one hashed here, compared in constant time."""
        derived = _derive(password, self.salt, self.n, self.r, self.p, len(self.key))
        return hmac.compare_digest(derived, self.key)

    def __str__(self) -> str:
        return f"{PREFIX}n={self.n},r={self.r},p={self.p}${_b64(self.salt)}${_b64(self.key)}"


def _derive(
    password: bytes, salt: bytes, n: int, r: int, p: int, length: int = _KEY_BYTES
) -> bytes:
    # scrypt needs about 128 * n * r * p bytes; OpenSSL refuses more than maxmem (32 MiB by
    # default), so allow what the parameters ask for, plus room for its bookkeeping.
    maxmem = 129 * n * r * p + (1 << 20)
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=length)


def hash_password(password: str | bytes) -> str:
    """The users-file secret for ``password`` (``scrypt$...``), with a random salt: what the
    ``passwd`` command writes, for programs that write users files themselves."""
    raw = password.encode() if isinstance(password, str) else password
    return str(ScryptHash.of(raw))


# ----------------------------------------------------------------------------------------------
# The table the gateway checks.


class Users:
    """The users table: hashed entries (``ScryptHash``), or clear-text ones (bytes) only when
    the operator allowed them. See the module docstring for how checks stay cheap."""

    def __init__(self, table: Mapping[str, ScryptHash | bytes], *, hash_workers: int = 1) -> None:
        self._table = dict(table)
        hashed = [s for s in self._table.values() if isinstance(s, ScryptHash)]
        # An unknown user is checked against this, made like the real entries (with their
        # parameters), so "no such user" and "wrong password" take the same time: usernames
        # cannot be probed.
        self._dummy: ScryptHash | bytes = (
            attrs.evolve(
                hashed[0],
                salt=secrets.token_bytes(_SALT_BYTES),
                key=secrets.token_bytes(_KEY_BYTES),
            )
            if hashed
            else secrets.token_bytes(16)
        )
        self._tag_key = secrets.token_bytes(32)
        self._verified: dict[str, bytes] = {}
        self._workers = hash_workers
        self._limiter: anyio.CapacityLimiter | None = None

    @classmethod
    def load(cls, path: str | Path, *, allow_plaintext: bool = False) -> Users:
        """Read a users file: one ``username:secret`` a line, blank lines and ``#`` comments
        ignored. Clear-text secrets are refused unless ``allow_plaintext``."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsersFileError(f"users file {path}: cannot read it: {exc}") from exc
        table: dict[str, ScryptHash | bytes] = {}
        clear: list[tuple[int, str]] = []
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, colon, secret = line.partition(":")
            where = f"users file {path}, line {number}"
            if not colon or not user or not secret:
                raise UsersFileError(f"{where}: expected 'username:password', got {line!r}")
            if user in table:
                raise UsersFileError(f"{where}: user {user!r} is listed twice")
            if secret.startswith(PREFIX):
                try:
                    table[user] = ScryptHash.parse(secret)
                except ValueError as exc:
                    raise UsersFileError(f"{where}: user {user!r}: {exc}") from None
            else:
                table[user] = secret.encode()
                clear.append((number, user))
        if not table:
            raise UsersFileError(f"users file {path}: no users (one 'username:password' a line)")
        if clear and not allow_plaintext:
            number, user = clear[0]
            more = f" (and {len(clear) - 1} more)" if len(clear) > 1 else ""
            raise UsersFileError(
                f"users file {path}, line {number}: clear-text password for {user!r}{more}; "
                f"hash the file with `{CONVERT_HINT.format(path=path)}`, "
                "or start with --allow-plaintext-users"
            )
        return cls(table)

    @property
    def plaintext(self) -> int:
        """How many entries hold a clear-text password."""
        return sum(1 for secret in self._table.values() if isinstance(secret, bytes))

    def check(self, username: str, password: bytes) -> bool:
        """True when ``password`` is ``username``'s: the full check, in the calling thread."""
        secret = self._table.get(username)
        expected = secret if secret is not None else self._dummy
        if isinstance(expected, bytes):
            ok = hmac.compare_digest(password, expected)
        else:
            ok = expected.verify(password)
        return ok and secret is not None

    async def authenticate(self, username: str, password: bytes) -> bool:
        """:meth:`check` for the event loop: scrypt in a worker thread (one at a time, so it
        never takes every core from the loop), and a success remembered for the next time."""
        secret = self._table.get(username)
        expected = secret if secret is not None else self._dummy
        if isinstance(expected, bytes):
            return self.check(username, password)  # clear text: nothing slow to move away
        tag = hmac.new(self._tag_key, password, hashlib.sha256).digest()
        known = self._verified.get(username)
        if known is not None and hmac.compare_digest(tag, known):
            return True
        if self._limiter is None:
            # Made here, in the event loop that uses it.
            self._limiter = anyio.CapacityLimiter(self._workers)
        ok = await anyio.to_thread.run_sync(expected.verify, password, limiter=self._limiter)
        if ok and secret is not None:
            self._verified[username] = tag
            return True
        return False

    def __len__(self) -> int:
        return len(self._table)


# ----------------------------------------------------------------------------------------------
# The passwd command.


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway.py passwd",
        description=(
            "Add, change or delete a user in the gateway's users file, or hash every clear-text "
            "entry of one (-U). The password is prompted for (twice) on a terminal, read as one "
            "line from standard input otherwise, or given with -b."
        ),
    )
    p.add_argument("-b", action="store_true", help="batch: the password is the last argument")
    p.add_argument("-D", action="store_true", help="delete USERNAME")
    p.add_argument("-U", action="store_true", help="hash every clear-text password in FILE")
    p.add_argument("file", type=Path, metavar="USERS_FILE")
    p.add_argument("username", nargs="?")
    p.add_argument("password", nargs="?")
    return p


def _read_password(username: str) -> str:
    if sys.stdin.isatty():
        first = getpass.getpass(f"Password for {username}: ")
        if getpass.getpass("Reenter password: ") != first:
            raise UsersFileError("passwords do not match")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def _write_atomically(path: Path, text: str) -> None:
    # Through a temporary file in the same directory: a crash never leaves half a users file,
    # and a gateway starting at that moment reads the old file or the new one.
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _edit(path: Path, username: str | None, password: str | None, delete: bool) -> str:
    """The file's new text: every line kept as it was but the one edited."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    out: list[str] = []
    found = False
    for raw in lines:
        user, colon, secret = raw.strip().partition(":")
        if raw.strip().startswith("#") or not colon:
            out.append(raw)
        elif username is None:  # -U: hash what is clear text, keep the rest
            hashed = secret if secret.startswith(PREFIX) else hash_password(secret)
            out.append(f"{user}:{hashed}")
        elif user == username:
            found = True
            if not delete:
                assert password is not None
                out.append(f"{user}:{hash_password(password)}")
        else:
            out.append(raw)
    if username is not None and not found:
        if delete:
            raise UsersFileError(f"users file {path}: no user {username!r}")
        assert password is not None
        out.append(f"{username}:{hash_password(password)}")
    return "".join(line + "\n" for line in out)


def passwd_main(argv: Sequence[str]) -> int:
    """``gateway.py passwd``: edit a users file; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.U:
            if args.username is not None or args.b or args.D:
                parser.error("-U takes only USERS_FILE")
            if not args.file.exists():
                raise UsersFileError(f"users file {args.file}: no such file")
            _write_atomically(args.file, _edit(args.file, None, None, delete=False))
            return 0
        if args.username is None:
            parser.error("USERNAME is required (or -U to convert a file)")
        name = args.username
        if ":" in name or not name.strip() or name != name.strip() or name.startswith("#"):
            raise UsersFileError(f"bad username {name!r} (no colon, no spaces around, no #)")
        if args.b != (args.password is not None) or (args.D and args.password is not None):
            parser.error("give PASSWORD with -b, and only then")
        password = None
        if not args.D:
            password = args.password if args.b else _read_password(args.username)
            if not password:
                raise UsersFileError("empty password")
        _write_atomically(args.file, _edit(args.file, args.username, password, delete=args.D))
    except (UsersFileError, OSError) as exc:
        print(f"gateway passwd: {exc}", file=sys.stderr)
        return 1
    return 0
