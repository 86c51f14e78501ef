# -*- test-case-name: tests.unit.test_writethrough -*-
"""Answers sent at once, for request/response protocols whose peer waits for each answer.

Twisted queues every ``transport.write`` for the next reactor turn: an ``epoll_ctl`` to watch for
writability, another ``epoll_wait`` and turn, the ``send``, and an ``epoll_ctl`` to stop
watching. Postfix's policy client sends one request and waits for its answer, so policyd paid
all of that per request: about a third of its CPU in the rate-limit benchmark (py-spy). When
nothing is queued ahead of the answer, sending it at once keeps the order of the bytes and
costs one ``send``; anything else (bytes already queued, a short send, an error) goes through
Twisted's own buffering, which then reports errors and flow control as always.

Only our own connection-counting wrapper is looked through, and only onto a plain TCP or unix
socket connection. Any other wrapper transforms the bytes (Twisted's TLS wrapper encrypts
them), so its ``write`` is the only way out: sending under it put answers on a TLS connection
in clear text. ``ProtocolWrapper`` forwards unknown attributes to its transport, so the check
is on the class, never on attributes such as ``socket``.

Twisted has no public "is anything queued" question, so this reads ``tcp.Connection``'s write
buffers (``dataBuffer``, ``offset``, ``_tempDataBuffer``); ``test_writethrough`` pins them, so a
Twisted upgrade that renames them fails a test instead of reordering answers.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.tcp import Connection

from mailplugins.connections import CountedProtocol


def _socket_transport(transport: Any) -> Connection | None:
    """The plain socket connection under our connection-counting wrapper, if that is all there is.

    ``unix:`` and ``systemd:`` listeners give ``tcp.Connection`` subclasses too.
    """
    while isinstance(transport, CountedProtocol):
        transport = transport.transport
    return transport if isinstance(transport, Connection) else None


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, sent at once when the socket has nothing queued."""
    real = _socket_transport(transport)
    if (
        real is None
        or not real.connected
        or real.disconnecting
        or real._tempDataBuffer
        or len(real.dataBuffer) > real.offset
    ):
        transport.write(data)
        return
    try:
        sent = real.socket.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        transport.write(data)  # Twisted meets the error again on its own write and reports it
        return
    if sent < len(data):
        transport.write(data[sent:])
