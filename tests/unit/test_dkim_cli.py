"""``mailplugins dkim ...``, ``dns-records`` and ``doctor --dns`` through the CLI, with DNS from a
stub server on loopback, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from mailplugins.config import load_config
from mailplugins.db.dkim_models import DkimKey
from mailplugins.db.engine import make_engine
from mailplugins.dns_records import split_txt
from tests.support.stubdns import StubDNS, stub_dns
from tests.unit.test_cli_accounts import Cli

MX = "mail.example.org"


@pytest.fixture
def cli(database_url: str, tmp_path: Path) -> Cli:
    config = tmp_path / "mailplugins.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"url": database_url},
        "dns": {"mx": MX, "dmarc_policy": "reject", "ttl": 300},
    }))
    tool = Cli(config)
    tool.ok("db", "upgrade")
    tool.ok("domain", "add", "example.org")
    return tool


@pytest.fixture
def stub() -> Iterator[StubDNS]:
    with stub_dns() as server:
        yield server


def _zone_record(output: str) -> tuple[str, list[str]]:
    """The name and strings of the one TXT line keygen printed."""
    [line] = [ln for ln in output.splitlines() if not ln.startswith(";")]
    name = line.split()[0].rstrip(".")
    strings = [part for index, part in enumerate(line.split('"')) if index % 2 == 1]
    return name, strings


def _private_keys(cli: Cli) -> list[str]:
    engine = make_engine(load_config(str(cli.config)).database)
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(DkimKey.private_key).order_by(DkimKey.id)).scalars())
    finally:
        engine.dispose()


def test_keygen_publish_activate_rotate_retire(cli: Cli, stub: StubDNS) -> None:
    out = cli.ok("dkim", "keygen", "Example.org", "--selector", "one")
    assert out.startswith("; created pending DKIM key one (rsa 2048) for example.org\n"
                          "; publish this record, then: mailplugins dkim activate example.org one\n")
    assert "PRIVATE" not in out
    name, strings = _zone_record(out)
    assert name == "one._domainkey.example.org" and all(len(s) <= 255 for s in strings)
    assert len(strings) == 2 and "".join(strings).startswith("v=DKIM1; k=rsa; p=MII")
    [pem] = _private_keys(cli)
    assert pem.startswith("-----BEGIN PRIVATE KEY-----")

    ns = ["--nameserver", stub.nameserver]
    err = cli.fails(1, "dkim", "activate", "example.org", "one", *ns)
    assert err == ("mailplugins: one._domainkey.example.org has no TXT record: publish what "
                   "'mailplugins dns-records example.org' shows, or --no-dns-check\n")
    stub.add(name, "TXT", [b"v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAwrong"])
    assert "the published record is not this key (its p= is another key)" in cli.fails(
        1, "dkim", "activate", "example.org", "one", *ns)
    stub.records[(name, "TXT")] = [[s.encode() for s in strings]]  # as published: several strings
    stub.servfail.add(name)
    assert "cannot check the published key" in cli.fails(1, "dkim", "activate", "example.org", "one", *ns)
    stub.servfail.clear()
    assert cli.ok("dkim", "activate", "example.org", "one", *ns) == (
        "activated one: example.org's mail is signed with it (rsa-sha256)\n")
    assert (name, "TXT", "udp") in stub.queries
    cli.fails(1, "dkim", "activate", "example.org", "one", "--no-dns-check")  # already active

    # Rotation: the new key is published and activated; the old one stays active, not signing.
    _name, new_strings = _zone_record(cli.ok("dkim", "keygen", "example.org", "--selector", "two"))
    stub.add("two._domainkey.example.org", "TXT", [s.encode() for s in new_strings])
    assert "one no longer signs but stays active and published" in cli.ok(
        "dkim", "activate", "example.org", "two", *ns)
    rows = json.loads(cli.ok("dkim", "list", "--json"))
    assert [(r["selector"], r["state"], r["signing"]) for r in rows] == [
        ("one", "active", False), ("two", "active", True)]
    assert rows[1]["record"] == "".join(new_strings) and rows[1]["algorithm"] == "rsa-sha256"
    assert all("PRIVATE" not in json.dumps(r) for r in rows)
    table = cli.ok("dkim", "list")
    assert "example.org  two  rsa 2048  active (signing)  created " in table
    assert "retired" in cli.ok("dkim", "retire", "example.org", "one")
    assert "is the last active DKIM key of example.org" in cli.fails(
        1, "dkim", "retire", "example.org", "two")
    assert _private_keys(cli)[0] == ""
    assert [r["state"] for r in json.loads(cli.ok("dkim", "list", "example.org", "--json"))] == [
        "retired", "active"]
    cli.fails(1, "dkim", "retire", "example.org", "nope")


def test_keygen_usage_errors(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (("--bits", "1024"), ("--bits", "8192"), ("--bits", "lots"), ("--algorithm", "dsa")):
        assert cli("dkim", "keygen", "example.org", *args)[0] == 2
        assert capsys.readouterr().err.count("\n") == 1  # argparse's one line
    assert cli("dkim", "keygen", "example.org", "--bits", "1024")[0] == 2
    assert "RSA keys of 1024 bits are refused: use 2048 to 4096" in capsys.readouterr().err
    assert "RSA keys only" in cli.fails(2, "dkim", "keygen", "example.org", "--algorithm", "ed25519",
                                        "--bits", "2048")
    assert "bad selector" in cli.fails(1, "dkim", "keygen", "example.org", "--selector", "a_b")
    assert cli("dkim", "activate", "example.org", "x", "--nameserver", "nonsense")[0] == 2
    out = cli.ok("dkim", "keygen", "example.org", "--algorithm", "ed25519")
    assert "DKIM key mp20" in out and "(ed25519)" in out
    _name, [value] = _zone_record(out)
    assert value.startswith("v=DKIM1; k=ed25519; p=") and len(value) == len("v=DKIM1; k=ed25519; p=") + 44
    assert cli.ok("dkim", "list").count("pending") == 1


def test_keygen_refuses_a_domain_that_is_not_local(cli: Cli) -> None:
    """A typo (exmaple.org) would be a key and a record nobody uses: exit 2, one line, no key;
    --force makes one for a domain that only sends from here."""
    err = cli.fails(2, "dkim", "keygen", "Exmaple.org")
    assert err == ("mailplugins: exmaple.org is not a local domain: 'mailplugins domain add "
                   "exmaple.org' first, or --force for a domain that only sends mail from here\n")
    assert cli.fails(2, "dkim", "keygen", "not a domain").count("\n") == 1
    assert _private_keys(cli) == []
    out = cli.ok("dkim", "keygen", "exmaple.org", "--force", "--algorithm", "ed25519")
    assert "for exmaple.org" in out
    assert len(_private_keys(cli)) == 1


def test_no_dns_check_and_activate_unknown(cli: Cli) -> None:
    cli.fails(1, "dkim", "activate", "example.org", "nope", "--no-dns-check")
    cli.ok("dkim", "keygen", "example.org", "--selector", "s", "--algorithm", "ed25519")
    assert "activated s" in cli.ok("dkim", "activate", "example.org", "s", "--no-dns-check")


def test_dns_records(cli: Cli, stub: StubDNS) -> None:
    name, strings = _zone_record(cli.ok("dkim", "keygen", "example.org", "--selector", "big",
                                        "--bits", "4096"))
    assert len(strings) == 3
    # Published as printed, the record is too big for UDP; activate reads it over TCP.
    stub.add(name, "TXT", [s.encode() for s in strings])
    cli.ok("dkim", "activate", "example.org", "big", "--nameserver", stub.nameserver)
    assert [q[2] for q in stub.queries] == ["udp", "tcp"]
    text = cli.ok("dns-records", "Example.org")
    lines = text.splitlines()
    assert lines[0] == f"example.org. 300 IN MX 10 {MX}."
    assert lines[1] == 'example.org. 300 IN TXT "v=spf1 mx -all"'
    assert lines[-1] == '_dmarc.example.org. 300 IN TXT "v=DMARC1; p=reject"'
    rows = json.loads(cli.ok("dns-records", "example.org", "--json"))
    [dkim] = [r for r in rows if r["purpose"] == "DKIM"]
    assert dkim["name"] == "big._domainkey.example.org" and len(dkim["strings"]) == 3
    assert "".join(dkim["strings"]) == dkim["value"] and dkim["strings"] == split_txt(dkim["value"])
    assert dkim["zone_line"] in lines
    assert "PRIVATE" not in text and "PRIVATE" not in json.dumps(rows)
    assert cli("dns-records", "not a domain")[0] == 2


def test_doctor_dns_against_a_stub_server(cli: Cli, stub: StubDNS) -> None:
    out = cli.ok("dkim", "keygen", "example.org", "--selector", "s1", "--algorithm", "ed25519")
    name, strings = _zone_record(out)
    cli.ok("dkim", "activate", "example.org", "s1", "--no-dns-check")
    doctor = ("doctor", "--dns", "--no-postfix", "--no-dovecot", "--nameserver", stub.nameserver)
    status, out, err = cli(*doctor)
    assert status == 1 and err == ""
    assert out.splitlines() == [
        f"dns: example.org MX: {MX} is not among the MX records (there are none)",
        'dns: example.org TXT: no SPF record (want "v=spf1 mx -all")',
        "dns: s1._domainkey.example.org TXT: active DKIM key s1 is not published: mail signed with "
        "it fails DKIM",
        'dns: _dmarc.example.org TXT: no DMARC record (want "v=DMARC1; p=reject")',
        "4 problem(s) found",
    ]
    stub.add("example.org", "MX", (10, MX))
    stub.add("example.org", "TXT", [b"v=spf1 mx -all"])
    stub.add(name, "TXT", [s.encode() for s in strings])
    stub.add("_dmarc.example.org", "TXT", [b"v=DMARC1; p=none"])
    status, out, _err = cli(*doctor)
    assert status == 1 and out.splitlines() == [
        "dns: _dmarc.example.org TXT: DMARC record has p=none, want p=reject", "1 problem(s) found"]
    stub.records[("_dmarc.example.org", "TXT")] = [[b"v=DMARC1; p=reject; rua=mailto:x@example.org"]]
    assert cli.ok(*doctor) == f"OK: DNS wired as {cli.config} says\n"
    stub.silent.add("_dmarc.example.org")
    status, out, _err = cli(*doctor[:-2], "--nameserver", stub.nameserver, "--nameserver", stub.nameserver)
    assert status == 1 and "dns: _dmarc.example.org TXT: lookup failed:" in out


def test_dns_records_warns_of_an_unqualified_mx_host(tmp_path: Path) -> None:
    config = tmp_path / "mailplugins.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": f"sqlite:///{tmp_path}/mail.db"},
                                      "dns": {"mx": "myhost"}}))
    cli = Cli(config)
    cli.ok("db", "upgrade")
    lines = cli.ok("dns-records", "example.org").splitlines()
    assert lines[:2] == ["; the MX host 'myhost' is not a fully qualified name: set dns.mx",
                         "example.org. 3600 IN MX 10 myhost."]


def test_keygen_refuses_a_world_readable_sqlite_database(tmp_path: Path) -> None:
    directory = tmp_path / "db"
    directory.mkdir()
    config = tmp_path / "mailplugins.yaml"
    config.write_text(yaml.safe_dump({"database": {"url": f"sqlite:///{directory}/mail.db"}}))
    cli = Cli(config)
    cli.ok("db", "upgrade")
    cli.ok("domain", "add", "example.org")
    os.chmod(directory / "mail.db", 0o644)
    os.chmod(directory, 0o755)
    err = cli.fails(1, "dkim", "keygen", "example.org", "--algorithm", "ed25519")
    assert "is readable by every local user" in err and f"chmod o-rwx {directory}" in err
    os.chmod(directory, 0o750)
    cli.ok("dkim", "keygen", "example.org", "--algorithm", "ed25519")


def test_activate_and_doctor_ask_milterd_nameservers(tmp_path: Path, stub: StubDNS) -> None:
    config = tmp_path / "mailplugins.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"url": f"sqlite:///{tmp_path}/mail.db"},
        "milterd": {"listen": "tcp:0:interface=127.0.0.1", "nameservers": [stub.nameserver],
                    "dns_timeout": 2},
    }))
    cli = Cli(config)
    cli.ok("db", "upgrade")
    cli.ok("domain", "add", "example.org")
    name, strings = _zone_record(cli.ok("dkim", "keygen", "example.org", "--algorithm", "ed25519"))
    assert "has no TXT record" in cli.fails(1, "dkim", "activate", "example.org", name.split(".")[0])
    assert stub.queries == [(name, "TXT", "udp")]  # asked milterd's server, not the system's
    stub.add(name, "TXT", [s.encode() for s in strings])
    cli.ok("dkim", "activate", "example.org", name.split(".")[0])
    status, out, _err = cli("doctor", "--dns", "--no-postfix", "--no-dovecot")
    assert status == 1 and "dns: _dmarc.example.org TXT: no DMARC record" in out
    assert ("_dmarc.example.org", "TXT", "udp") in stub.queries
