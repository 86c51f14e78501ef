# -*- test-case-name: tests.unit.test_sdnotify -*-
"""systemd's notify protocol (``Type=notify``): one datagram to ``$NOTIFY_SOCKET``, no libsystemd."""

from __future__ import annotations

import os
import socket
import time


def notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``state`` (newline-separated ``KEY=value``); False when not run by systemd.

    Errors are swallowed deliberately: a lost status message must never take a mail daemon down.
    """
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8"), address)
    except OSError:
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def reloading() -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")
