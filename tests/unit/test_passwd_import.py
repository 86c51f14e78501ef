"""``mailplugins user import``: users with their existing hashes from a Dovecot passwd-file."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
import yaml

from mailplugins.cli import main
from mailplugins.hashing import check_password
from mailplugins.passwd_import import parse_passwd_line

# Made with `doveadm pw -s SHA512-CRYPT -r 5000 -p "pw one"`.
SHA512 = (
    "{SHA512-CRYPT}$6$PP7N.SKA22N7.G/J$2yzNixi11CybOIet.G8T3Zj.lDklPoBgzKcB"
    "5MtCW.sM5JzDcHxIPdrB/MV91ncW3z9/QMyEX.kVKvGKIQ46w0"
)


def run(config: Path, *args: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(["--config", str(config), *args], io.StringIO(stdin), out, err)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mailplugins.yaml"
    path.write_text(yaml.safe_dump({"database": {"url": f"sqlite:///{tmp_path}/mail.db"}}))
    assert run(path, "db", "upgrade")[0] == 0
    return path


# -- parsing -----------------------------------------------------------------------------------------


def test_parse_full_line_with_quota() -> None:
    entry = parse_passwd_line(
        "alice@example.org:{BLF-CRYPT}$2y$05$abc:5000:5000::/var/vmail/example.org/alice::"
        "userdb_quota_rule=*:storage=1G userdb_mail=maildir:~/Maildir\n")
    assert entry is not None
    assert entry.address == "alice@example.org"
    assert entry.password == "{BLF-CRYPT}$2y$05$abc"
    assert entry.quota_bytes == 1024**3


@pytest.mark.parametrize(
    ("rule", "size"),
    [("*:storage=100", 100 * 1024), ("*:storage=10M", 10 * 1024**2), ("*:bytes=5000", 5000),
     ("*:bytes=2k", 2048)],
)
def test_parse_quota_units(rule: str, size: int) -> None:
    entry = parse_passwd_line(f"a@b.example:{{PLAIN}}x:1:1::/h::userdb_quota_rule={rule}")
    assert entry is not None
    assert entry.quota_bytes == size


@pytest.mark.parametrize(
    ("stored", "expected"),
    [("$6$salt$hash", "{SHA512-CRYPT}$6$salt$hash"), ("$5$s$h", "{SHA256-CRYPT}$5$s$h"),
     ("$1$s$h", "{MD5-CRYPT}$1$s$h"), ("$2y$10$x", "{BLF-CRYPT}$2y$10$x"),
     ("abDEfg.hij12", "{CRYPT}abDEfg.hij12"),
     ("{SSHA256.b64}abc", "{SSHA256.b64}abc"), ("{ARGON2ID}$argon2id$v=19$x", "{ARGON2ID}$argon2id$v=19$x")],
)
def test_parse_schemes(stored: str, expected: str) -> None:
    entry = parse_passwd_line(f"u@d.example:{stored}")
    assert entry is not None
    assert entry.password == expected


def test_parse_skips_comments_and_blank_lines() -> None:
    assert parse_passwd_line("# comment\n") is None
    assert parse_passwd_line("   \n") is None


def test_parse_default_domain() -> None:
    entry = parse_passwd_line("bob:{PLAIN}pw", "example.org")
    assert entry is not None
    assert entry.address == "bob@example.org"


@pytest.mark.parametrize(
    ("line", "message"),
    [("bob:{PLAIN}pw", "not an address"), ("justaname", "expected user:password"),
     ("u@d.example:{CRAM-MD5}abc", "unsupported password scheme CRAM-MD5"),
     ("u@d.example::1:1", "expected user:password"),
     ("u@d.example:$y$j9T$salt$hash", "crypt format 'y' cannot be verified"),
     ("u@d.example:{CRYPT}$7$abc", "crypt format '7' cannot be verified"),
     ("u@d.example:{PLAIN}x:1:1::/h::nopassword", "no equivalent"),
     ("u@d.example:{PLAIN}x:1:1::/h::userdb_quota_rule=*:messages=10", "unreadable quota")],
)
def test_parse_refuses(line: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_passwd_line(line)
    assert "{" not in str(info.value).replace("{CRAM", "")  # never echoes a hash


# -- the command ---------------------------------------------------------------------------------------


def test_import_file(config: Path, tmp_path: Path) -> None:
    passwd = tmp_path / "users"
    passwd.write_text(
        "# from the old server\n"
        f"alice@example.org:{SHA512}:5000:5000::/var/vmail/example.org/alice::"
        "userdb_quota_rule=*:bytes=1000000\n"
        "bob@example.org:{PLAIN}bob pw:5000:5000::/var/vmail/example.org/bob::\n"
        "carol@other.example:{PLAIN}c:5000:5000::/x::\n"
        "broken line\n"
    )
    run(config, "domain", "add", "example.org")
    status, out, err = run(config, "user", "import", str(passwd))
    assert status == 1
    assert out == "imported 2, skipped 0 existing, 2 failed\n"
    assert f"{passwd}:4: domain other.example does not exist" in err
    assert f"{passwd}:5: expected user:password" in err

    status, out, err = run(config, "user", "import", str(passwd), "--create-domains")
    assert out == "imported 1, skipped 2 existing, 1 failed\n"

    from mailplugins.config import load_config
    from mailplugins.db.engine import make_engine
    from mailplugins.store import Store

    store = Store(make_engine(load_config(str(config)).database))
    alice = store.get_mailbox("alice@example.org")
    assert alice is not None
    assert alice.password == SHA512
    assert alice.quota_bytes == 1000000
    assert check_password("pw one", alice.password)
    assert store.get_mailbox("carol@other.example") is not None
    store.engine.dispose()


def test_import_update_and_stdin(config: Path) -> None:
    run(config, "domain", "add", "example.org")
    assert run(config, "user", "import", "-", stdin="bob@example.org:{PLAIN}one\n")[0] == 0
    status, out, _ = run(config, "user", "import", "-", stdin="bob@example.org:{PLAIN}two\n")
    assert (status, out) == (0, "imported 0, skipped 1 existing, 0 failed\n")
    status, out, _ = run(config, "user", "import", "-", "--update", stdin="bob@example.org:{PLAIN}two\n")
    assert (status, out) == (0, "imported 1, skipped 0 existing, 0 failed\n")


def test_import_missing_file(config: Path, tmp_path: Path) -> None:
    status, _, err = run(config, "user", "import", str(tmp_path / "nope"))
    assert status == 2
    assert err.startswith("mailplugins: cannot read")


def test_imported_doveadm_hashes_verify(config: Path) -> None:
    """Hashes doveadm makes today import unchanged and check with the same password."""
    lines = []
    for number, scheme in enumerate(("SHA512-CRYPT", "BLF-CRYPT", "SSHA512", "ARGON2ID")):
        made = subprocess.run(["doveadm", "pw", "-s", scheme, "-p", f"secret {number}"],
                              capture_output=True, text=True, check=True).stdout.strip()
        lines.append(f"u{number}@example.org:{made}:5000:5000::/home/u{number}::")
    run(config, "domain", "add", "example.org")
    status, _out, err = run(config, "user", "import", "-", stdin="\n".join(lines) + "\n")
    assert status == 0, err
    from mailplugins.config import load_config
    from mailplugins.db.engine import make_engine
    from mailplugins.store import Store

    store = Store(make_engine(load_config(str(config)).database))
    for number in range(4):
        record = store.get_mailbox(f"u{number}@example.org")
        assert record is not None
        assert check_password(f"secret {number}", record.password)
        assert not check_password("wrong", record.password)
    store.engine.dispose()


def test_import_names_accounts_that_can_never_log_in(config: Path, tmp_path: Path) -> None:
    """authd refuses empty passwords: an imported hash of "" locks the account, and says so."""
    from passlib.hash import sha512_crypt

    empty_sha512 = "{SHA512-CRYPT}" + sha512_crypt.using(rounds=5000).hash("")
    passwd = tmp_path / "users"
    passwd.write_text(
        f"alice@example.org:{SHA512}\n"
        f"empty@example.org:{empty_sha512}\n"
        "plain@example.org:{PLAIN}\n"
        "broken@example.org:{SHA512-CRYPT}$6$nonsense\n"
    )
    run(config, "domain", "add", "example.org")
    status, out, err = run(config, "user", "import", str(passwd))
    assert status == 0
    assert out == "imported 4, skipped 0 existing, 0 failed; 3 imported can never log in\n"
    lines = err.splitlines()
    assert lines[0] == (
        f"{passwd}:2: empty@example.org can never log in: its password is empty, and authd "
        "refuses empty passwords (set one with: mailplugins user passwd)"
    )
    assert lines[1].startswith(f"{passwd}:3: plain@example.org can never log in: its password is empty")
    assert lines[2].startswith(f"{passwd}:4: broken@example.org can never log in: its stored hash "
                               "cannot be checked")
    assert len(lines) == 3
