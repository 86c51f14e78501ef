"""Slow senders against the real daemons: one byte a second is cut off at the deadline.

Before the request/line deadlines every received byte postponed the idle timeout, so a peer
trickling one byte a second held its connection forever. Here policyd (``request_timeout``),
authd's auth-client, dict and HTTP listeners (``line_timeout``) and deliver's LMTP
(``idle_timeout``, counted from the previous reply) run with a 2 s deadline; a
real socket sends one byte a second and must be disconnected 2 s after its first byte (plus a
margin for a loaded machine), with exactly the bytes the protocol allows before the close,
while a normal client on another connection is served throughout.

Half-closed connections are here too, since they are the other way a peer stops sending: the
line protocols answer what was complete, then close; HTTP closes at once.
"""

from __future__ import annotations

import base64
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlencode

import pytest

from mailplugins.hashing import hash_password
from tests.rig import Daemons, free_port, short_tempdir

pytestmark = pytest.mark.e2e
DEADLINE = 2.0
#: Allowed lateness of the close: the reactor's timer, the scheduler and the 1 s pacing.
MARGIN = 1.5


@dataclass
class Running:
    daemons: Daemons
    http_port: int


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    root = short_tempdir()
    http_port = free_port()
    daemons = Daemons(root, {
        "policyd": {"listen": f"unix:{root}/policy.sock:mode=600",
                    "request_timeout": f"{DEADLINE}s"},
        "authd": {"sasl_listen": f"unix:{root}/auth.sock:mode=600",
                  "dict_listen": f"unix:{root}/dict.sock:mode=600",
                  "http_listen": f"tcp:{http_port}:interface=127.0.0.1",
                  "line_timeout": f"{DEADLINE}s"},
        # LMTP counts from the previous reply (the greeting here), not from the first byte.
        "mail": {"location": f"{root}/mail/%d/%n/Maildir"},
        "deliver": {"listen": f"unix:{root}/lmtp.sock:mode=600", "hostname": "mx.test",
                    "idle_timeout": f"{DEADLINE}s"},
    })
    daemons.store.add_domain("example.org")
    daemons.store.add_mailbox("alice@example.org", hash_password("s3cret", daemons.config.passwords))
    try:
        yield Running(daemons.start(), http_port)
    finally:
        daemons.stop()
        shutil.rmtree(root, ignore_errors=True)


def open_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def open_tcp(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until(sock: socket.socket, wanted: bytes) -> bytes:
    received = b""
    sock.settimeout(10)
    while wanted not in received:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"closed before {wanted!r}; got {received!r}")
        received += chunk
    return received


@dataclass
class Case:
    """One listener: how to connect, what a client sends, what it gets back."""

    connect: Callable[[Running], socket.socket]
    #: Read by each client right after connecting (the auth-client handshake).
    greeting: bytes
    #: Sent once by the normal client before its requests (the protocol's hello).
    setup: bytes
    #: What the slow sender trickles (longer than the deadline allows at 1 byte/s).
    slow: bytes
    #: Exactly what the slow sender receives before the close (after ``greeting``).
    before_close: bytes
    #: The normal client's n-th request, and the bytes that end its answer.
    request: Callable[[int], bytes]
    answer: Callable[[int], bytes]
    #: What the daemon logs when it cuts the slow sender off.
    logged: str


def http_request() -> bytes:
    body = urlencode({"user": "alice@example.org", "password": "s3cret", "service": "imap"})
    return (
        b"POST /verify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )


PLAIN = base64.b64encode(b"\0alice@example.org\0s3cret").decode()
CASES = {
    "policyd": Case(
        connect=lambda r: open_unix(f"{r.daemons.root}/policy.sock"),
        greeting=b"",
        setup=b"",
        slow=b"request=smtpd_access_policy\nprotocol_state=CONNECT\n\n",
        before_close=b"",
        request=lambda n: b"request=smtpd_access_policy\nprotocol_state=CONNECT\n"
        b"client_address=192.0.2.1\n\n",
        answer=lambda n: b"action=DUNNO\n\n",
        logged="request not complete 2.0s after its first byte, closing",
    ),
    "auth-client": Case(
        connect=lambda r: open_unix(f"{r.daemons.root}/auth.sock"),
        greeting=b"DONE\n",
        setup=b"VERSION\t1\t0\nCPID\t2\n",
        slow=b"VERSION\t1\t0\nCPID\t1\n",
        before_close=b"",
        request=lambda n: f"AUTH\t{n}\tPLAIN\tservice=smtp\tresp={PLAIN}\n".encode(),
        answer=lambda n: f"OK\t{n}\tuser=alice@example.org\n".encode(),
        logged="line not complete 2.0s after its first byte",
    ),
    "dict": Case(
        connect=lambda r: open_unix(f"{r.daemons.root}/dict.sock"),
        greeting=b"",
        setup=b"H3\t2\t0\t\tauth\n",
        slow=b"H3\t2\t0\t\tauth\n",
        before_close=b"",
        request=lambda n: f"Lshared/passdb/nobody{n}@example.org\n".encode(),
        answer=lambda n: b"N\n",
        logged="dropping dict connection: line not complete 2s after its first byte",
    ),
    "lmtp": Case(
        connect=lambda r: open_unix(f"{r.daemons.root}/lmtp.sock"),
        greeting=b"ready\r\n",
        setup=b"LHLO normal.test\r\n",
        slow=b"LHLO slow.test\r\n",
        before_close=b"421 4.4.2 mx.test Timeout: client too slow, closing connection\r\n",
        request=lambda n: b"NOOP\r\n",
        answer=lambda n: b"250 2.0.0 OK\r\n",
        logged="LMTP client too slow: no complete command or too little DATA in 2.0s",
    ),
    "http": Case(
        connect=lambda r: open_tcp(r.http_port),
        greeting=b"",
        setup=b"",
        slow=http_request(),
        before_close=b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
        b"Content-Length: 0\r\n\r\n",
        request=lambda n: http_request(),
        answer=lambda n: b"ok\n\r\n0\r\n\r\n",
        logged="not complete 2.0s after its first byte: closing",
    ),
}


def drain(sock: socket.socket) -> bytes:
    """What is left to read on a socket the peer has closed."""
    data = b""
    sock.settimeout(1.0)
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except OSError:
        pass
    return data


def trickle_until_closed(sock: socket.socket, data: bytes, served: Callable[[], None]) -> tuple[
    float, bytes
]:
    """Send ``data`` one byte a second (the 1 s pause is a recv timeout, so the close is seen at
    once); between bytes ``served()`` checks the normal client. Returns (seconds from the first
    byte to the close, bytes received meanwhile)."""
    received = b""
    first = time.monotonic()
    for index in range(len(data)):
        try:
            sock.sendall(data[index : index + 1])
        except (BrokenPipeError, ConnectionResetError):
            # Closed while we were between bytes (a loaded machine can run the server's
            # deadline before our last recv): what it sent first is still to be read.
            return time.monotonic() - first, received + drain(sock)
        pause_until = time.monotonic() + 1.0
        while (left := pause_until - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                break
            except ConnectionResetError:
                return time.monotonic() - first, received
            if not chunk:
                return time.monotonic() - first, received
            received += chunk
        served()
    raise AssertionError(f"still open after {time.monotonic() - first:.1f}s and {len(data)} bytes")


@pytest.mark.parametrize("name", list(CASES))
def test_one_byte_a_second_is_cut_off_while_others_are_served(running: Running, name: str) -> None:
    case = CASES[name]
    normal = case.connect(running)
    slow = case.connect(running)
    exchanges = 0

    def served() -> None:
        nonlocal exchanges
        exchanges += 1
        normal.sendall(case.request(exchanges))
        answer = case.answer(exchanges)
        assert answer in read_until(normal, answer)

    try:
        if case.greeting:
            read_until(normal, case.greeting)
            read_until(slow, case.greeting)
        normal.sendall(case.setup)
        elapsed, received = trickle_until_closed(slow, case.slow, served)
        assert received == case.before_close
        assert DEADLINE - 0.2 <= elapsed <= DEADLINE + MARGIN, f"closed after {elapsed:.2f}s"
        assert exchanges >= 1
        served()  # and still after the slow one is gone
    finally:
        normal.close()
        slow.close()
    output = running.daemons.output()
    assert case.logged in output
    assert "Traceback" not in output


def read_to_close(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, float]:
    """Everything received until the server closes, and how long that took."""
    received = b""
    start = time.monotonic()
    sock.settimeout(timeout)
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        received += chunk
    return received, time.monotonic() - start


@pytest.mark.parametrize("name", ["policyd", "auth-client", "dict"])
def test_half_close_gets_the_answer_then_the_close(running: Running, name: str) -> None:
    """``printf ... | nc -N``: the peer sends its request and shuts its side down."""
    case = CASES[name]
    for attempt in range(5):  # the EOF may arrive in the same read as the request or later
        sock = case.connect(running)
        try:
            if case.greeting:
                read_until(sock, case.greeting)
            sock.sendall(case.setup + case.request(1))
            if attempt % 2:
                sock.sendall(case.request(2)[:5])  # a partial request, dropped at the EOF
            sock.shutdown(socket.SHUT_WR)
            received, elapsed = read_to_close(sock)
        finally:
            sock.close()
        assert received == case.answer(1)
        assert elapsed < 2.0
    assert "Traceback" not in running.daemons.output()


def test_http_half_close_is_closed_at_once(running: Running) -> None:
    """Twisted's HTTP channel does not support half-close: the connection is closed as soon as
    the EOF is read, and an answer not yet written is dropped (Dovecot never half-closes)."""
    sock = CASES["http"].connect(running)
    try:
        sock.sendall(http_request())
        sock.shutdown(socket.SHUT_WR)
        received, elapsed = read_to_close(sock)
    finally:
        sock.close()
    assert received == b"" or received.startswith(b"HTTP/1.1 200 OK\r\n")
    assert elapsed < 2.0
