"""Thousands of idle connections: each daemon keeps serving up to its limit and refuses cleanly.

A refused connection is closed at once (deliver first says ``421``, as SMTP expects; policyd
and authd send nothing, since their clients must never read unasked bytes), and the daemon
keeps answering the connections it holds.
"""

from __future__ import annotations

import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.rig import Daemons, free_port, short_tempdir, wait_until

pytestmark = pytest.mark.e2e
LIMIT = 500
EXTRA = 700  # 1,200 connections per daemon in all


@pytest.fixture(scope="module")
def daemons() -> Iterator[Daemons]:
    root = short_tempdir()
    local = "interface=127.0.0.1"
    running = Daemons(root, {
        "policyd": {"listen": f"unix:{root}/policy.sock:mode=600", "max_connections": LIMIT,
                    "metrics": f"tcp:{free_port()}:{local}"},
        "authd": {"sasl_listen": f"unix:{root}/auth.sock:mode=600", "max_connections": LIMIT,
                  "metrics": f"tcp:{free_port()}:{local}"},
        "deliver": {"listen": f"unix:{root}/lmtp.sock:mode=600", "max_connections": LIMIT,
                    "metrics": f"tcp:{free_port()}:{local}"},
    })
    running.store.add_domain("example.org")
    try:
        yield running.start()
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def connect(path: Path) -> socket.socket:
    """Connect, retrying while the listen backlog is full (EAGAIN on a unix socket)."""
    deadline = time.monotonic() + 10
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect(str(path))
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def open_connections(daemons: Daemons, name: str) -> float:
    """The daemon's open connections as its /metrics counts them (over all its workers)."""
    port = getattr(daemons.config, name).metrics.split(":")[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        lines = reply.read().decode().splitlines()
    prefix = f"mailplugins_{name}_open_connections{{"
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


def closed_after(sock: socket.socket) -> bytes:
    """Everything the server sent before closing (raises if it keeps the connection open)."""
    received = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return received
        received += chunk


def read_until(sock: socket.socket, wanted: bytes) -> bytes:
    received = b""
    while wanted not in received:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def served(path: Path, probe: bytes, answer: bytes) -> bool:
    """A new connection gets ``answer`` to ``probe`` (False if refused)."""
    sock = connect(path)
    try:
        sock.sendall(probe)
        return answer in read_until(sock, answer)
    except (ConnectionResetError, BrokenPipeError):
        return False
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("name", "socket_name", "refusal", "probe", "answer"),
    [
        ("policyd", "policy.sock", b"",
         b"request=smtpd_access_policy\nprotocol_state=CONNECT\nclient_address=192.0.2.1\n\n",
         b"action=DUNNO\n\n"),
        ("authd", "auth.sock", b"", b"VERSION\t1\t0\nCPID\t1\n", b"VERSION\t1\t2\n"),
        ("deliver", "lmtp.sock", b"421 4.3.2 Too many connections, try again later\r\n",
         b"NOOP\r\n", b"250 2.0.0"),
    ],
)
def test_idle_connections_up_to_the_limit_then_clean_refusals(
    daemons: Daemons, name: str, socket_name: str, refusal: bytes, probe: bytes, answer: bytes
) -> None:
    path = Path(daemons.root) / socket_name
    held = []
    try:
        for _ in range(LIMIT):
            held.append(connect(path))
        # Every held connection accepted and counted before the extra ones arrive: with
        # several workers the kernel's queue is drained by all of them at once, so an extra
        # connection could otherwise be counted before the last held one.
        wait_until(lambda: open_connections(daemons, name) == LIMIT, timeout=30,
                   what=f"{name} to count {LIMIT} open connections")
        refused = 0
        for _ in range(EXTRA):
            extra = connect(path)
            try:
                assert closed_after(extra) == refusal
                refused += 1
            finally:
                extra.close()
        assert refused == EXTRA
        # The held connections still work: the first one gets a real answer.
        first = held[0]
        first.sendall(probe)
        assert answer in read_until(first, answer)
    finally:
        for sock in held:
            sock.close()
    # Once they are gone, new connections are served again (as soon as the daemon has seen the
    # closes: a daemon answering a half-close finishes closing one reactor turn later).
    wait_until(lambda: served(path, probe, answer), timeout=10, what="a new connection served")
    assert "Traceback" not in daemons.output()
