"""The gateway's users files: the ``passwd`` command, the hashes it writes, and how the gateway
refuses a clear-text file (or, when told to, accepts it loudly)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from device_gateway.users import ScryptHash, Users, UsersFileError, hash_password
from tests.examples.test_gateway import GATEWAY, RawClient

pytestmark = pytest.mark.timeout(90)


def passwd(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``gateway.py passwd ...`` as an operator runs it."""
    return subprocess.run(
        [sys.executable, str(GATEWAY), "passwd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_passwd_writes_salted_scrypt_entries_and_edits_in_place(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    assert passwd("-b", str(users), "alice", "s3cret").returncode == 0
    assert passwd(str(users), "bob", stdin="hunter2\n").returncode == 0  # from stdin
    assert users.stat().st_mode & 0o777 == 0o600  # a new file is the owner's alone
    lines = users.read_text().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["alice", "bob"]
    for line in lines:
        secret = line.split(":", 1)[1]
        assert secret.startswith("scrypt$n=16384,r=8,p=1$"), secret
        assert "s3cret" not in secret and "hunter2" not in secret
    table = Users.load(users)
    assert table.check("alice", b"s3cret") and table.check("bob", b"hunter2")
    assert not table.check("alice", b"hunter2") and not table.check("carol", b"s3cret")

    # The same password twice gives two different entries: the salt is random.
    assert hash_password("same") != hash_password("same")
    # Changing a password replaces the line in place; deleting removes it.
    users.write_text("# fleet accounts\n" + users.read_text())
    assert passwd("-b", str(users), "alice", "n3w").returncode == 0
    assert passwd("-D", str(users), "bob").returncode == 0
    text = users.read_text()
    assert text.startswith("# fleet accounts\nalice:scrypt$") and "bob" not in text
    assert Users.load(users).check("alice", b"n3w")
    missing = passwd("-D", str(users), "bob")
    assert missing.returncode == 1 and "no user 'bob'" in missing.stderr
    bad = passwd("-b", str(users), "ev:il", "x")
    assert bad.returncode == 1 and "bad username" in bad.stderr


def test_passwd_u_hashes_a_clear_text_file_and_keeps_what_is_hashed(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    kept = hash_password("hunter2")
    users.write_text(f"# old file\nalice:s3cret\nbob:{kept}\n\ncarol:pa:ss\n")
    result = passwd("-U", str(users))
    assert result.returncode == 0, result.stderr
    lines = users.read_text().splitlines()
    assert lines[0] == "# old file" and lines[2] == f"bob:{kept}" and lines[3] == ""
    table = Users.load(users)
    assert table.plaintext == 0
    # The password is everything after the first colon, before and after conversion.
    assert table.check("alice", b"s3cret") and table.check("carol", b"pa:ss")


def test_a_clear_text_users_file_is_refused_with_how_to_convert_it(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text(f"alice:{hash_password('s3cret')}\nbob:hunter2\ncarol:x\n")
    with pytest.raises(UsersFileError) as refused:
        Users.load(users)
    message = str(refused.value)
    assert "line 2" in message and "'bob'" in message and "(and 1 more)" in message
    assert f"gateway.py passwd -U {users}" in message and "--allow-plaintext-users" in message
    argv = [sys.executable, str(GATEWAY), "--port", "0", "--users", str(users)]
    argv += ["--data", str(tmp_path / "t.sqlite3")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()  # one line, saying what to do
    assert line.startswith("gateway: users file") and "passwd -U" in line
    assert "listening" not in result.stdout


def test_allow_plaintext_users_starts_with_a_loud_warning_and_logs_in(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text("alice:s3cret\n")
    log = tmp_path / "gateway.log"
    argv = [sys.executable, str(GATEWAY), "--host", "127.0.0.1", "--port", "0"]
    argv += ["--users", str(users), "--data", str(tmp_path / "t.sqlite3")]
    argv += ["--allow-plaintext-users"]
    with log.open("w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        port = int(line.rsplit(":", 1)[1])
        client = RawClient(port)
        try:
            assert client.connect("dev-1", "alice", "s3cret") == 0
        finally:
            client.close()
        wrong = RawClient(port)
        try:
            assert wrong.connect("dev-2", "alice", "guess") == 4
        finally:
            wrong.close()
    finally:
        proc.terminate()
        proc.wait(15)
    [warning] = [line for line in log.read_text().splitlines() if "INSECURE" in line]
    assert " WARNING " in warning and "clear-text" in warning and "passwd -U" in warning


def test_malformed_hash_entries_name_their_line(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    for bad, words in [
        ("scrypt$n=16384,r=8$salt$hash", "bad scrypt parameters"),
        ("scrypt$n=1000,r=8,p=1$c2FsdA$aGFzaGhhc2hoYXNoaGFzaA", "scrypt parameters out of range"),
        ("scrypt$n=16384,r=8,p=1$$", "salt or hash too short"),
    ]:
        users.write_text(f"# x\nalice:{bad}\n")
        with pytest.raises(UsersFileError, match=f"line 2: user 'alice': {words}"):
            Users.load(users)


@pytest.mark.anyio
async def test_authenticate_pays_scrypt_once_per_user_and_every_time_for_a_failure() -> None:
    users = Users({"alice": ScryptHash.of(b"s3cret"), "bob": ScryptHash.of(b"hunter2")})

    async def timed(user: str, password: bytes) -> tuple[bool, float]:
        started = time.perf_counter()
        ok = await users.authenticate(user, password)
        return ok, time.perf_counter() - started

    ok, first = await timed("alice", b"s3cret")
    assert ok
    # The next CONNECTs of the same device are cheap (a storm of reconnects is not a storm of
    # scrypt runs) ...
    again = [await timed("alice", b"s3cret") for _ in range(20)]
    assert all(ok for ok, _ in again)
    assert max(t for _, t in again) < first / 5, (first, again)
    # ... but a wrong password, for a known user or an unknown one, takes the full check.
    for user, password in [("alice", b"guess"), ("mallory", b"s3cret"), ("bob", b"s3cret")]:
        ok, took = await timed(user, password)
        assert not ok
        assert took > first / 5, (user, took, first)
    # Many concurrent first logins run scrypt one at a time, off the event loop.
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.005)
            ticks += 1

    checked: list[bool] = []

    async def login() -> None:
        checked.append(await users.authenticate("bob", b"guess"))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(ticker)
        async with anyio.create_task_group() as logins:
            for _ in range(4):
                logins.start_soon(login)
        tasks.cancel_scope.cancel()
    assert checked == [False] * 4
    assert ticks >= 4, ticks  # the loop kept running while scrypt did
