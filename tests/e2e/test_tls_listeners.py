"""``ssl:`` listeners: every answer of every daemon goes out inside TLS.

Before: policyd's write-through answers (``mailplugins/writethrough.py``) unwrapped every
ProtocolWrapper, Twisted's TLS wrapper included, and sent the answer in clear text on the raw
socket; a TLS client failed with ``WRONG_VERSION_NUMBER``. Real ``mailplugins serve``, real
TLS client (Python's ``ssl``), a self-signed certificate made by ``openssl`` for the test.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.stacks import insecure_tls
from tests.rig import Daemons, free_port, short_tempdir

pytestmark = pytest.mark.e2e

REQUEST = (
    b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
    b"client_address=192.0.2.1\nsender=a@example.net\nrecipient=nobody@example.org\n"
    b"instance=1.2.3\n\n"
)


def self_signed(directory: Path) -> tuple[Path, Path]:
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return key, cert


@pytest.fixture(scope="module")
def ports() -> Iterator[dict[str, int]]:
    root = short_tempdir()
    key, cert = self_signed(root)
    ports = {name: free_port() for name in ("policyd", "authd", "deliver")}

    def ssl_endpoint(name: str) -> str:
        return f"ssl:{ports[name]}:interface=127.0.0.1:privateKey={key}:certKey={cert}"

    running = Daemons(root, {
        "policyd": {"listen": ssl_endpoint("policyd")},
        "authd": {"sasl_listen": ssl_endpoint("authd")},
        "deliver": {"listen": ssl_endpoint("deliver")},
        "mail": {"location": f"{root}/mail/%d/%n"},
    })
    running.store.add_domain("example.org")
    try:
        running.start()
        yield ports
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def tls_connection(port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return insecure_tls().wrap_socket(raw, server_hostname="localhost")


def read_answer(sock: ssl.SSLSocket, end: bytes = b"\n\n") -> bytes:
    received = b""
    while not received.endswith(end):
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def test_policyd_answers_inside_tls(ports: dict[str, int]) -> None:
    with tls_connection(ports["policyd"]) as sock:
        # Several requests on one connection: each answer is a write-through candidate.
        for _ in range(3):
            sock.sendall(REQUEST)
            assert read_answer(sock) == b"action=550 5.1.1 User unknown\n\n"
        # Two requests in one TLS record: the second answer queues behind the first.
        sock.sendall(REQUEST * 2)
        answers = read_answer(sock)
        while answers.count(b"\n\n") < 2:
            answers += read_answer(sock)
        assert answers == b"action=550 5.1.1 User unknown\n\n" * 2


def test_authd_handshake_inside_tls(ports: dict[str, int]) -> None:
    with tls_connection(ports["authd"]) as sock:
        sock.sendall(b"VERSION\t1\t2\nCPID\t1\n")
        handshake = read_answer(sock, b"DONE\n")
        assert handshake.startswith(b"VERSION\t1\t") and b"MECH\tPLAIN" in handshake


def test_deliver_greets_and_answers_inside_tls(ports: dict[str, int]) -> None:
    with tls_connection(ports["deliver"]) as sock:
        assert read_answer(sock, b"\r\n").startswith(b"220 ")
        sock.sendall(b"LHLO client.example\r\n")
        reply = read_answer(sock, b"\r\n")
        while b"\r\n250 " not in b"\r\n" + reply:  # the last line of a multi-line reply
            reply += read_answer(sock, b"\r\n")
        assert reply.startswith(b"250-")
        sock.sendall(b"QUIT\r\n")
        assert read_answer(sock, b"\r\n").startswith(b"221 ")
