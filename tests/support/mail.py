"""Raw messages <-> the (name, value) header pairs and body milterd's DKIM code takes (tests).

Values are as a milter sees them: the text after the colon, leading whitespace kept, folds as
CRLF, no final CRLF.
"""

from __future__ import annotations

from collections.abc import Sequence

Headers = list[tuple[str, str]]


def split_message(raw: bytes) -> tuple[Headers, bytes]:
    raw = raw if b"\r\n" in raw else raw.replace(b"\n", b"\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    headers: Headers = []
    for line in head.decode("utf-8", "surrogateescape").split("\r\n"):
        if line[:1] in (" ", "\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + "\r\n" + line)
        else:
            name, _, value = line.partition(":")
            headers.append((name, value))
    return headers, body


def join_message(headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    head = "".join(f"{name}:{value}\r\n" for name, value in headers)
    return head.encode("utf-8", "surrogateescape") + b"\r\n" + body


def read_records(text: str) -> dict[str, list[bytes]]:
    """``name value`` lines (tests/data/dkim/*-dns) as a key-name -> TXT records mapping."""
    records: dict[str, list[bytes]] = {}
    for line in text.splitlines():
        if line.strip():
            name, value = line.split(None, 1)
            records.setdefault(name.lower(), []).append(value.strip().encode())
    return records
