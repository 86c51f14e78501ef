"""A stub authoritative DNS server on loopback, UDP and TCP, in a thread (tests only).

Answers from a dict, so blocking code (``mailplugins.dns``, pyspf, the CLI) can be tested against
a real DNS exchange with no network: ``records`` maps (name, type) to a list of answers (for
TXT, each answer a list of byte strings; for MX, ``(preference, exchange)``); names in
``servfail`` answer SERVFAIL, names in ``silent`` get no answer at all (a timeout). A name with
any record answers NODATA for other types; an unknown name is NXDOMAIN. UDP replies over 512
bytes are truncated (TC) so the client retries over TCP, as with a real server.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Records = dict[tuple[str, str], list[Any]]


def _key(name: str) -> str:
    return name.rstrip(".").lower()


class StubDNS:
    def __init__(self, records: Records | None = None) -> None:
        self.records: Records = {(_key(n), t.upper()): v for (n, t), v in (records or {}).items()}
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        #: (name, type, "udp"|"tcp") of every query, in order.
        self.queries: list[tuple[str, str, str]] = []
        self.port = 0

    def add(self, name: str, rdtype: str, *answers: Any) -> None:
        self.records.setdefault((_key(name), rdtype.upper()), []).extend(answers)

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = _key(question.name.to_text())
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype, transport))
        if name in self.silent:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        found = self.records.get((name, rdtype))
        if found:
            rrset = dns.rrset.RRset(question.name, dns.rdataclass.IN, question.rdtype)
            for item in found:
                rrset.add(self._rdata(rdtype, item), 300)
            response.answer.append(rrset)
        elif not any(key[0] == name for key in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        data = response.to_wire()
        if transport == "udp" and len(data) > 512:
            response.answer = []
            response.flags |= dns.flags.TC
            data = response.to_wire()
        return data

    @staticmethod
    def _rdata(rdtype: str, item: Any) -> dns.rdata.Rdata:
        if rdtype == "TXT":
            strings = [item] if isinstance(item, bytes | str) else list(item)
            text = " ".join('"' + (s.decode() if isinstance(s, bytes) else s)
                            .replace("\\", "\\\\").replace('"', '\\"') + '"' for s in strings)
            return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, text)
        if rdtype == "MX":
            preference, exchange = item
            return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.MX,
                                       f"{preference} {exchange.rstrip('.')}.")
        return dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), str(item))

    @property
    def nameserver(self) -> str:
        """In the config's ``nameservers`` form."""
        return f"127.0.0.1:{self.port}"


class _UDPHandler(socketserver.BaseRequestHandler):
    server: Any

    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.stub.answer(data, "udp")
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    server: Any

    def handle(self) -> None:
        sock: socket.socket = self.request
        head = sock.recv(2)
        if len(head) < 2:
            return
        (length,) = struct.unpack("!H", head)
        data = b""
        while len(data) < length:
            more = sock.recv(length - len(data))
            if not more:
                return
            data += more
        reply = self.server.stub.answer(data, "tcp")
        if reply is not None:
            sock.sendall(struct.pack("!H", len(reply)) + reply)


class _UDP(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True


class _TCP(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


@contextmanager
def stub_dns(records: Records | None = None, *, host: str = "127.0.0.1", port: int = 0,
             stub: StubDNS | None = None) -> Iterator[StubDNS]:
    """Run a :class:`StubDNS` on ``host`` (one free port, UDP and TCP, or ``port``: 53 for
    programs that only read resolv.conf) for the ``with`` block; ``stub``: serve that one's
    records (a second address for the same answers)."""
    stub = stub or StubDNS(records)
    for _attempt in range(20):
        udp = _UDP((host, port), _UDPHandler)
        bound = udp.server_address[1]
        try:
            tcp = _TCP((host, bound), _TCPHandler)
        except OSError:
            udp.server_close()
            continue
        break
    else:  # pragma: no cover
        raise RuntimeError("no free port for the stub DNS server")
    udp.stub = tcp.stub = stub  # type: ignore[attr-defined]
    stub.port = stub.port or bound
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
               for s in (udp, tcp)]
    for thread in threads:
        thread.start()
    try:
        yield stub
    finally:
        for server in (udp, tcp):
            server.shutdown()
            server.server_close()
