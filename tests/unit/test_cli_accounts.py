"""The account commands (mailplugins.cli.accounts) in-process, on SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from mailplugins.cli import main
from mailplugins.hashing import check_password


class Cli:
    def __init__(self, config: Path) -> None:
        self.config = config

    def __call__(self, *args: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        status = main(["--config", str(self.config), *args], io.StringIO(stdin), out, err)
        return status, out.getvalue(), err.getvalue()

    def ok(self, *args: str, stdin: str = "") -> str:
        status, out, err = self(*args, stdin=stdin)
        assert status == 0, err
        return out

    def fails(self, status: int, *args: str, stdin: str = "") -> str:
        got, _out, err = self(*args, stdin=stdin)
        assert got == status, err
        assert err.startswith("mailplugins: ") and err.count("\n") == 1 and "Traceback" not in err
        return err


@pytest.fixture
def cli(database_url: str, tmp_path: Path) -> Cli:
    config = tmp_path / "mailplugins.yaml"
    config.write_text(yaml.safe_dump({
        "database": {"url": database_url},
        "passwords": {"scheme": "SHA512-CRYPT", "sha_crypt_rounds": 5000},
    }))
    tool = Cli(config)
    assert "upgraded from empty" in tool.ok("db", "upgrade")
    assert "up to date" in tool.ok("db", "upgrade")
    return tool


def test_round_trip(cli: Cli) -> None:
    cli.ok("domain", "add", "Example.org")
    cli.ok("domain", "add", "bücher.de")
    cli.fails(1, "domain", "add", "example.org")
    assert [d["name"] for d in json.loads(cli.ok("domain", "list", "--json"))] == [
        "example.org", "xn--bcher-kva.de"]

    cli.ok("user", "add", "bob@example.org", "--password-stdin", "--quota", "1G", stdin="s3cret pw\n")
    cli.ok("user", "add", "alice@example.org", "--password-stdin", "--services", "imap,pop3",
           stdin="alicepw\n")
    cli.fails(1, "user", "add", "bob@example.org", "--password-stdin", stdin="x\n")
    cli.fails(1, "user", "add", "carol@nowhere.example", "--password-stdin", stdin="x\n")
    cli.fails(2, "user", "add", "carol@example.org")  # no password source
    cli.fails(1, "user", "add", "carol@example.org", "--password-stdin", stdin="\n")
    users = json.loads(cli.ok("user", "list", "--json"))
    assert [(u["address"], u["quota_bytes"], u["services"], u["scheme"]) for u in users] == [
        ("alice@example.org", 0, ["imap", "pop3"], "SHA512-CRYPT"),
        ("bob@example.org", 1024**3, ["imap", "lmtp", "pop3", "smtp"], "SHA512-CRYPT"),
    ]
    assert "bob@example.org    enabled  quota=1073741824" in cli.ok("user", "list")

    from mailplugins.config import load_config
    from mailplugins.db.engine import make_engine
    from mailplugins.store import Store

    store = Store(make_engine(load_config(str(cli.config)).database))
    bob = store.get_mailbox("bob@example.org")
    assert bob is not None and check_password("s3cret pw", bob.password)
    cli.ok("user", "passwd", "bob@example.org", "--password-stdin", stdin="n3w\n")
    bob = store.get_mailbox("bob@example.org")
    assert bob is not None and check_password("n3w", bob.password)
    cli.fails(1, "user", "passwd", "nobody@example.org", "--password-stdin", stdin="x\n")

    cli.ok("user", "disable", "bob@example.org")
    assert json.loads(cli.ok("user", "list", "--json"))[1]["enabled"] is False
    cli.ok("user", "enable", "bob@example.org")
    cli.ok("user", "quota", "bob@example.org", "10M")
    cli.ok("user", "services", "bob@example.org", "smtp,imap")
    bob = store.get_mailbox("bob@example.org")
    assert bob is not None and bob.enabled and bob.quota_bytes == 10 * 1024**2
    assert bob.services == {"smtp", "imap"}
    assert cli("user", "services", "bob@example.org", "smtp,ftp")[0] == 2  # argparse usage error

    assert cli.ok("alias", "add", "info@example.org", "bob@example.org", "alice@example.org") == (
        "info@example.org -> bob@example.org, alice@example.org\n")
    cli.ok("alias", "add", "@bücher.de", "bob@example.org")
    assert json.loads(cli.ok("alias", "list", "--json")) == [
        {"address": "info@example.org", "targets": ["bob@example.org", "alice@example.org"]},
        {"address": "@xn--bcher-kva.de", "targets": ["bob@example.org"]},
    ]
    cli.ok("alias", "remove", "info@example.org", "alice@example.org")
    cli.fails(1, "alias", "remove", "nothing@example.org")

    cli.ok("sender", "grant", "bob@example.org", "info@example.org")
    cli.fails(1, "sender", "grant", "bob@example.org", "info@example.org")
    assert json.loads(cli.ok("sender", "list", "--json")) == [
        {"login": "bob@example.org", "address": "info@example.org"}]
    cli.ok("sender", "revoke", "bob@example.org", "info@example.org")
    cli.fails(1, "sender", "revoke", "bob@example.org", "info@example.org")

    out = cli.ok("app-password", "add", "bob@example.org", "phone", "--services", "imap")
    generated = out.splitlines()[-1]
    assert len(generated) == 19 and generated.count("-") == 3
    apps = json.loads(cli.ok("app-password", "list", "bob@example.org", "--json"))
    assert [(a["name"], a["services"]) for a in apps] == [("phone", ["imap"])]
    assert check_password(generated, store.app_passwords_for(bob.id)[0].password)
    assert generated not in cli.ok("app-password", "list", "bob@example.org")
    cli.ok("app-password", "revoke", "bob@example.org", "phone")
    cli.fails(1, "app-password", "revoke", "bob@example.org", "phone")

    cli.ok("user", "remove", "alice@example.org")
    cli.fails(1, "domain", "remove", "example.org")
    cli.ok("domain", "remove", "example.org", "--force")
    assert json.loads(cli.ok("user", "list", "--json")) == []
    store.engine.dispose()


def test_master_user(cli: Cli) -> None:
    cli.ok("domain", "add", "example.org")
    cli.ok("user", "add", "admin@example.org", "--password-stdin", stdin="pw\n")
    assert "is a master user" in cli.ok("user", "master", "admin@example.org", "on")
    (row,) = json.loads(cli.ok("user", "list", "--json"))
    assert row["master"] is True
    assert cli.ok("user", "list").split()[-1] == "master"
    assert "no longer" in cli.ok("user", "master", "admin@example.org", "off")
    assert json.loads(cli.ok("user", "list", "--json"))[0]["master"] is False
    assert "does not exist" in cli.fails(1, "user", "master", "nobody@example.org", "on")
    assert cli("user", "master", "admin@example.org", "maybe")[0] == 2
