"""sd_notify: READY/RELOADING/STOPPING to a path or abstract socket, nothing without systemd."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from mailplugins import sdnotify


def test_notify_path_and_abstract_sockets(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(path)})
    assert server.recv(100) == b"READY=1"
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"mp-test-{os.getpid()}"
    abstract.bind("\0" + name)
    assert sdnotify.notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
    assert abstract.recv(100) == b"STOPPING=1"
    server.close()
    abstract.close()


def test_notify_without_systemd_is_a_no_op(tmp_path: Path) -> None:
    assert not sdnotify.notify("READY=1", {})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": "vsock:1:2"})
    assert not sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "absent")})
