"""The newcomer's path, short of Postfix: ``dkim keygen`` -> the printed record published in DNS
-> ``dkim activate`` -> milterd's KeyStore -> a signed message that dkimpy verifies against the
record as DNS serves it (both algorithms, dual signing), on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
import yaml

from mailplugins import dns
from mailplugins.config import load_config
from mailplugins.db.engine import make_engine
from milterd.dkim import MessageSigner
from milterd.keys import KeyStore
from tests.support.stubdns import StubDNS, stub_dns
from tests.unit.test_cli_accounts import Cli
from tests.unit.test_dkim_cli import _zone_record

HEADERS = [("From", " Alice <alice@example.org>"), ("To", " bob@example.net"),
           ("Subject", " a rotated\r\n\tkey"), ("Date", " Fri, 04 Dec 2026 19:00:00 +0000"),
           ("Message-ID", " <1@example.org>")]
BODY = b"Hello Bob,\r\n\r\nsigned with keys from the database.\r\n"


@pytest.fixture
def cli(database_url: str, tmp_path: Path) -> Cli:
    config = tmp_path / "mailplugins.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": database_url}}))
    tool = Cli(config)
    tool.ok("db", "upgrade")
    tool.ok("domain", "add", "example.org")
    return tool


@pytest.fixture
def stub() -> Iterator[StubDNS]:
    with stub_dns() as server:
        yield server


def _sign_and_verify(cli: Cli, stub: StubDNS) -> list[tuple[str, bool]]:
    """Sign with KeyStore's keys; (selector, dkimpy's verdict) per signature, top first."""
    engine = make_engine(load_config(str(cli.config)).database)
    try:
        keys = KeyStore(engine).signing_keys("example.org")
    finally:
        engine.dispose()
    signer = MessageSigner(keys, HEADERS, now=int(time.time()))
    signer.feed(BODY)
    signatures = signer.finish()
    message = b"".join(b"DKIM-Signature:" + s.encode() + b"\r\n" for s in signatures)
    message += b"".join(f"{n}:{v}\r\n".encode() for n, v in HEADERS) + b"\r\n" + BODY

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes:
        text = name.decode() if isinstance(name, bytes) else name
        found = dns.txt_records(text, nameservers=[stub.nameserver], timeout=timeout)
        return found[0] if found else b""

    verifier = dkim.DKIM(message)
    results = []
    for index, _ in enumerate(signatures):
        ok = verifier.verify(idx=index, dnsfunc=dnsfunc)
        results.append((verifier.selector.decode(), bool(ok)))
    return results


def _publish(cli: Cli, stub: StubDNS, *args: str) -> str:
    name, strings = _zone_record(cli.ok("dkim", "keygen", "example.org", *args))
    stub.add(name, "TXT", [s.encode() for s in strings])
    return name.split(".")[0]


def test_keygen_to_verified_signatures_and_rotation(cli: Cli, stub: StubDNS) -> None:
    ns = ("--nameserver", stub.nameserver)
    old = _publish(cli, stub, "--selector", "old")
    cli.ok("dkim", "activate", "example.org", old, *ns)
    assert _sign_and_verify(cli, stub) == [("old", True)]
    new = _publish(cli, stub, "--selector", "new", "--bits", "3072")
    ed = _publish(cli, stub, "--algorithm", "ed25519")
    assert _sign_and_verify(cli, stub) == [("old", True)]  # pending keys do not sign
    cli.ok("dkim", "activate", "example.org", new, *ns)
    cli.ok("dkim", "activate", "example.org", ed, *ns)
    assert _sign_and_verify(cli, stub) == [("new", True), (ed, True)]  # dual signing, RSA on top
    cli.ok("dkim", "retire", "example.org", old)
    cli.ok("dkim", "retire", "example.org", ed)
    assert _sign_and_verify(cli, stub) == [("new", True)]
