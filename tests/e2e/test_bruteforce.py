"""Brute force against a real authd over its auth-client socket (what Postfix's smtpd speaks).

100 wrong passwords from one address trigger the penalty; the right password from another
address still works, well inside Postfix's 10 s limit; passwords never reach the log.
"""

from __future__ import annotations

import base64
import shutil
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path

import pytest

from mailplugins.hashing import hash_password
from tests.rig import Daemons, short_tempdir

pytestmark = pytest.mark.e2e
ATTACKER = "192.0.2.66"
FRIEND = "198.51.100.5"
_ids = count(1)


class AuthClient:
    """A minimal auth-client protocol client, as Postfix's xsasl_dovecot_server uses it."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.sock.sendall(b"VERSION\t1\t0\nCPID\t4242\n")
        while self.file.readline() != b"DONE\n":
            pass

    def plain(self, user: str, password: str, rip: str) -> tuple[str, float]:
        request = next(_ids)
        resp = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        started = time.monotonic()
        self.sock.sendall(
            f"AUTH\t{request}\tPLAIN\tservice=smtp\tnologin\tlip=127.0.0.1\trip={rip}"
            f"\tresp={resp}\n".encode()
        )
        line = self.file.readline().decode()
        return line.split("\t", 1)[0], time.monotonic() - started

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def authd() -> Iterator[Daemons]:
    root = short_tempdir()
    daemons = Daemons(root, {
        # The default database budget (2 s): the attack's 100 shared-failure writes go through
        # authd's own writer, never in front of the mailbox lookups (they once did, and a
        # lookup queued behind them became a temporary failure; tests/unit/test_shared_writes.py
        # counts that no write is queued in the lookups' pool).
        "database": {"url": f"sqlite:///{root}/mail.db"},
        "authd": {
            "sasl_listen": f"unix:{root}/auth.sock:mode=600",
            "failure_delay": "0s",
            "penalty_threshold": 3,
            "penalty_initial": "1s",
            "penalty_max": "4s",
        },
    }, ["authd"])
    daemons.store.add_domain("example.org")
    for user in ("alice", "bob"):
        password = hash_password(f"{user}-right", daemons.config.passwords)
        daemons.store.add_mailbox(f"{user}@example.org", password)
    try:
        yield daemons.start()
    finally:
        daemons.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_hundred_wrong_passwords_then_the_right_one_elsewhere(authd: Daemons) -> None:
    path = Path(authd.root) / "auth.sock"

    def attack(worker: int) -> list[str]:
        client = AuthClient(path)
        try:
            return [client.plain("alice@example.org", f"guess-{worker}-{n}", ATTACKER)[0]
                    for n in range(4)]
        finally:
            client.close()

    try:
        with ThreadPoolExecutor(max_workers=25) as pool:
            results = [outcome for batch in pool.map(attack, range(25)) for outcome in batch]
    except OSError as exc:
        other = [line for line in authd.output().splitlines() if "authentication failed" not in line]
        raise AssertionError(f"authd closed a connection: {exc}\n" + "\n".join(other[-40:])) from exc
    assert results == ["FAIL"] * 100

    client = AuthClient(path)
    try:
        # The attacker's address is now held back, even with a right password for someone else.
        outcome, took = client.plain("bob@example.org", "bob-right", ATTACKER)
        assert outcome == "OK"
        assert took >= 0.9
        # From another address the right password works: bob at once, alice (whose login was
        # attacked) within the penalty cap, far inside Postfix's 10 s.
        outcome, took = client.plain("bob@example.org", "bob-right", FRIEND)
        assert (outcome, took < 0.9) == ("OK", True)
        outcome, took = client.plain("alice@example.org", "alice-right", FRIEND)
        assert outcome == "OK"
        assert took < 5.0
    finally:
        client.close()

    log = authd.output()
    assert "authentication failed: user=alice@example.org rip=192.0.2.66" in log
    assert "guess-" not in log and "alice-right" not in log and "bob-right" not in log
