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
def policyd() -> Iterator[tuple[Daemons, int]]:
    root = short_tempdir()
    key, cert = self_signed(root)
    port = free_port()
    running = Daemons(root, {
        "policyd": {"listen": f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"},
    }, ["policyd"])
    running.store.add_domain("example.org")
    try:
        yield running.start(), port
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def read_answer(sock: ssl.SSLSocket) -> bytes:
    received = b""
    while not received.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def test_policyd_answers_inside_tls(policyd: tuple[Daemons, int]) -> None:
    _daemons, port = policyd
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            insecure_tls().wrap_socket(raw, server_hostname="localhost") as sock:
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
