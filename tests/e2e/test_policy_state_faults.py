"""Database faults under a running policyd: slower than the budget, unreachable, back again.

``mailplugins serve policyd`` on a PostgreSQL database with only greylisting on, spoken to
over the policy protocol directly. A table lock held by another session makes the greylist
query hang (slower than the check's timeout); forbidding connections makes the database
unreachable. Each time policyd must answer the greylist fallback (DUNNO) instead of making
Postfix wait, and once the database is usable again decide for real without a restart.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import PG_ADMIN_URL, _server_database
from tests.rig import Daemons, free_port, short_tempdir

pytestmark = pytest.mark.e2e

GREYLISTED = "DEFER_IF_PERMIT 4.7.1 Greylisted, please try again later"


@pytest.fixture
def pg_url() -> Iterator[str]:
    yield from _server_database(PG_ADMIN_URL, "postgresql")


@pytest.fixture
def policyd(pg_url: str) -> Iterator[tuple[Daemons, int]]:
    root = short_tempdir("mp-psf-")
    port = free_port()
    daemons = Daemons(
        Path(root) / "mp",
        {
            "database": {"url": pg_url, "pool_size": 2, "timeout": "1s"},
            "policyd": {
                "listen": f"tcp:{port}:interface=127.0.0.1",
                "budget": "2s",
                "recipient_validation": False, "relay_control": False,
                "sender_login_match": False, "spoof_protection": False,
                "greylist": {"timeout": "1s", "hostname": "mx.test.example"},
            },
        },
        ["policyd"],
    )
    try:
        daemons.start()
        yield daemons, port
    finally:
        daemons.stop()
        shutil.rmtree(root, ignore_errors=True)


def ask(port: int, sender: str, client: str = "192.0.2.1") -> str:
    attrs = {"request": "smtpd_access_policy", "protocol_state": "RCPT",
             "client_address": client, "client_name": "unknown", "sender": sender,
             "recipient": "bob@example.org", "instance": f"i.{sender}"}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(f"{k}={v}\n".encode() for k, v in attrs.items()) + b"\n")
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            assert chunk, "policyd closed the connection"
            reply += chunk
    return reply.decode().split("\n", 1)[0].removeprefix("action=")


def test_slow_then_unreachable_then_recovered(policyd: tuple[Daemons, int], pg_url: str) -> None:
    daemons, port = policyd
    assert ask(port, "first@remote.example") == GREYLISTED, daemons.output()

    # Slower than the budget: another session holds the greylisting tables locked.
    locker = create_engine(pg_url)
    with locker.connect() as conn:
        conn.execute(text("LOCK TABLE policy_greylist, policy_greylist_clients "
                          "IN ACCESS EXCLUSIVE MODE"))
        assert ask(port, "slow@remote.example") == "DUNNO", daemons.output()
        conn.rollback()
    locker.dispose()
    assert ask(port, "second@remote.example") == GREYLISTED, daemons.output()

    # Unreachable: no new connections, existing ones terminated.
    name = pg_url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})
    try:
        assert ask(port, "third@remote.example") == "DUNNO", daemons.output()
        assert ask(port, "fourth@remote.example") == "DUNNO"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true"))
        admin.dispose()

    # Back: decisions are real again, same process.
    assert ask(port, "fifth@remote.example") == GREYLISTED, daemons.output()
    assert "greylist check failed" in daemons.output()
