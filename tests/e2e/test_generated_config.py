"""The generated snippets in private stock Postfix and Dovecot, and ``doctor`` against them.

Once per release (``release``: Debian 12's Postfix 3.7 / Dovecot 2.3, Debian 13's Postfix 3.10 /
Dovecot 2.4), with the settings generated for that release. Postfix must accept the
main.cf/master.cf settings (``postfix check`` and a real start, with the submission listener
up), ``postconf -n``/``-P`` must show them, Dovecot must accept and run the dovecot.conf
snippet, and ``mailplugins doctor`` must find nothing wrong with the result,
then report a setting broken on purpose (naming the line that fixes it) and exit 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devrig.release import Release
from mailplugins.wiring.dovecot import DovecotOptions, dovecot_conf_text, dovecot_config
from mailplugins.wiring.postfix import PostfixOptions, postfix_config
from tests.rig import REPO, Daemons, Dovecot, Postfix, free_port, port_open, run, short_tempdir

LUA_SCRIPT = REPO / "authd" / "lua" / "mailplugins-auth.lua"

pytestmark = pytest.mark.e2e


def dovecot_release(release: Release) -> str:
    return "2.4" if release.dovecot24 else "2.3"


def tool_dir(release: Release, directory: Path) -> Path:
    """``doveconf``/``dovecot``/``doveadm``/``postconf`` wrappers running ``release``'s tools, to put
    first in PATH for a program that runs them itself (``mailplugins doctor``)."""
    import shlex

    directory.mkdir(parents=True, exist_ok=True)
    for tool in ("doveconf", "dovecot", "doveadm", "postconf"):
        # Absolute paths: the wrapper directory comes first in PATH, in and out of the root.
        where = next(f"/usr/{d}/{tool}" for d in ("sbin", "bin")
                     if release.path(f"/usr/{d}/{tool}").exists())
        wrapper = directory / tool
        wrapper.write_text("#!/bin/sh\nexec " + " ".join(
            shlex.quote(part) for part in release.command([where])) + ' "$@"\n')
        wrapper.chmod(0o755)
    return directory


@dataclass
class Wired:
    release: Release
    root: Path
    daemons: Daemons
    postfix: Postfix
    dovecot: Dovecot
    submission_port: int
    cert: Path
    key: Path
    dovecot_etc: Path

    def doctor(self, *extra: str) -> subprocess.CompletedProcess[str]:
        tools = tool_dir(self.release, self.root / "bin")
        env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}
        cmd = [
            sys.executable, "-m", "mailplugins.cli", "--config", str(self.daemons.config_path),
            "doctor",
            "--postfix-config-dir", str(self.postfix.etc),
            "--dovecot-config", str(self.dovecot.config_path),
            "--queue-directory", str(self.postfix.queue_dir),
            "--submission", f"127.0.0.1:{self.submission_port}", "--no-chroot",
            "--tls-cert", str(self.cert), "--tls-key", str(self.key),
            "--dovecot-directory", str(self.dovecot_etc),
            *extra,
        ]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
                              env=env)


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=mx.test.example", "-keyout", str(key), "-out", str(cert)])
    return cert, key


@pytest.fixture(scope="module")
def wired(release: Release) -> Iterator[Wired]:
    root = short_tempdir("mp-gen-")
    cert, key = make_cert(root)
    submission_port = free_port()
    # The Postfix object only computes paths until start(): the daemons' sockets go in its queue.
    postfix = Postfix(root, release=release)
    private = postfix.queue_dir / "private"
    daemons = Daemons(
        root / "mp",
        {
            "mail": {"location": str(root / "vmail/%d/%n/Maildir"), "uid": 5000, "gid": 5000},
            "policyd": {"listen": f"unix:{private}/mailplugins-policy:mode=660"},
            "authd": {
                "sasl_listen": f"unix:{private}/mailplugins-auth:mode=660",
                "dict_listen": f"unix:{root}/dict.sock:mode=660",
                "http_listen": f"tcp:{free_port()}:interface=127.0.0.1",
            },
            "deliver": {"listen": f"unix:{private}/mailplugins-deliver:mode=660"},
        },
    )
    daemons.store.add_domain("example.org")
    daemons.store.add_domain("example.net")
    snippet = postfix_config(daemons.config, PostfixOptions(
        queue_directory=str(postfix.queue_dir), submission=f"127.0.0.1:{submission_port}",
        chroot=False, tls_cert=str(cert), tls_key=str(key),
        domain_names=tuple(d.name for d in daemons.store.list_domains()),
        version=".".join(map(str, release.postfix_version)),
    ))
    assert snippet.warnings == ()
    postfix = Postfix(root, smtp_port=postfix.smtp_port, main=snippet.main_dict(),
                      services=snippet.master_lines(), release=release)
    dovecot_etc = root / "dovecot-etc"
    dovecot_etc.mkdir()
    # 2.3: the dict passdb/userdb (the default); 2.4 has no dict driver: always Lua.
    dsnippet = dovecot_config(daemons.config, DovecotOptions(
        config_directory=str(dovecot_etc), tls_cert=str(cert), tls_key=str(key),
        postfix_queue_directory=str(postfix.queue_dir), version=dovecot_release(release),
        lua_script=str(LUA_SCRIPT), lua_script_text=LUA_SCRIPT.read_text(),
    ))
    for generated in dsnippet.files:
        Path(generated.path).write_text(generated.text)
    dovecot = Dovecot(root, conf=dovecot_conf_text(dsnippet), release=release)
    try:
        postfix.start()
        dovecot.start()
        yield Wired(release, root, daemons, postfix, dovecot, submission_port, cert, key, dovecot_etc)
    finally:
        dovecot.stop()
        postfix.stop()
        daemons.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_postfix_accepts_and_shows_the_generated_settings(wired: Wired) -> None:
    assert wired.postfix.check().returncode == 0
    shown = wired.postfix.postconf("-n").stdout
    private = wired.postfix.queue_dir / "private"
    assert "virtual_transport = lmtp:unix:private/mailplugins-deliver\n" in shown, private
    assert "smtpd_sasl_path = private/mailplugins-auth\n" in shown
    assert "virtual_mailbox_domains = example.net, example.org\n" in shown
    assert ("smtpd_recipient_restrictions = check_policy_service { unix:private/mailplugins-policy, "
            "timeout=10s, default_action=DEFER_IF_PERMIT, policy_context=smtp }\n") in shown
    params = wired.postfix.postconf("-P").stdout
    service = f"127.0.0.1:{wired.submission_port}/inet"
    assert f"{service}/smtpd_sasl_auth_enable = yes\n" in params
    assert f"{service}/smtpd_tls_security_level = encrypt\n" in params
    # The submission listener is really up, and offers STARTTLS but no AUTH before it.
    assert port_open(wired.submission_port)
    ehlo = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{wired.submission_port}", "--quit-after", "EHLO",
         "--timeout", "20"], capture_output=True, text=True, timeout=60, check=False,
    ).stdout
    assert "250-STARTTLS" in ehlo
    assert "AUTH" not in ehlo.split("EHLO", 1)[1]
    assert "warning" not in wired.postfix.log_text().lower(), wired.postfix.log_text()[-2000:]


def test_dovecot_accepts_the_generated_snippet(wired: Wired) -> None:
    result = wired.dovecot.doveconf("-n")
    shown = result.stdout
    assert result.returncode == 0 and result.stderr == "", result.stderr
    root = wired.root
    assert "ssl = required\n" in shown
    if wired.release.dovecot24:
        assert ("mail_path = " + str(root) + "/vmail/%{user | domain | lower}/"
                "%{user | username | lower}/Maildir\n") in shown
        assert f"passdb lua {{\n  lua_file = {wired.dovecot_etc}/mailplugins-auth.lua\n}}" in shown
        assert f"userdb lua {{\n  lua_file = {wired.dovecot_etc}/mailplugins-auth.lua\n}}" in shown
    else:
        assert f"mail_location = maildir:{root}/vmail/%d/%n/Maildir\n" in shown
        assert f"  args = {wired.dovecot_etc}/mailplugins-dict-auth.conf.ext\n  driver = dict\n" in shown
    # Running, it serves IMAP with STARTTLS and refuses LOGIN before it.
    assert "error" not in wired.dovecot.log_text().lower(), wired.dovecot.log_text()


def test_dovecot_accepts_the_lua_variant(wired: Wired, tmp_path: Path) -> None:
    script = REPO / "authd" / "lua" / "mailplugins-auth.lua"
    options = DovecotOptions(
        config_directory=str(tmp_path), lua=True, lua_script=str(script),
        lua_script_text=script.read_text(), tls_cert=str(wired.cert), tls_key=str(wired.key),
        version=dovecot_release(wired.release),
    )
    snippet = dovecot_config(wired.daemons.config, options)
    for generated in snippet.files:
        Path(generated.path).write_text(generated.text)
    conf = tmp_path / "dovecot.conf"
    text = dovecot_conf_text(snippet)
    if wired.release.dovecot24:  # the version must be the first setting
        head, _, rest = text.partition("dovecot_storage_version = 2.4.0\n")
        text = head + "dovecot_storage_version = 2.4.0\n" + f"base_dir = {tmp_path}/run\n" + rest
    else:
        text = f"base_dir = {tmp_path}/run\n" + text
    conf.write_text(text + "protocols = imap\n")
    result = run(wired.release.command(["doveconf", "-c", str(conf), "-n"]), check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    shown = result.stdout
    assert ("passdb lua {\n" if wired.release.dovecot24 else "  driver = lua\n") in shown
    lua = next(Path(f.path) for f in snippet.files if f.path.endswith(".lua"))
    http_port = wired.daemons.config.authd.http_listen[0].split(":")[1]
    assert f'local base = "http://127.0.0.1:{http_port}"' in lua.read_text()


def test_doctor_is_happy_with_the_generated_setup(wired: Wired) -> None:
    result = wired.doctor()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("OK: postfix and dovecot wired as")


def test_doctor_reports_broken_settings_with_the_fix(wired: Wired, tmp_path: Path) -> None:
    postconf = wired.postfix.postconf
    service = f"127.0.0.1:{wired.submission_port}/inet"
    original = (wired.postfix.etc / "main.cf").read_text(), (wired.postfix.etc / "master.cf").read_text()
    try:
        postconf("-e", "virtual_transport = lmtp:inet:127.0.0.1:24")
        postconf("-P", "-e", f"{service}/smtpd_tls_security_level=may")
        postconf("-e", "smtpd_recipient_restrictions = permit")
        wired.daemons.store.add_domain("new.example")
        result = wired.doctor("--no-dovecot")
    finally:
        wired.daemons.store.remove_domain("new.example")
        (wired.postfix.etc / "main.cf").write_text(original[0])
        (wired.postfix.etc / "master.cf").write_text(original[1])
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "main.cf: virtual_transport is 'lmtp:inet:127.0.0.1:24'" in out
    assert "fix: postconf -e 'virtual_transport = lmtp:unix:private/mailplugins-deliver'" in out
    assert f"fix: postconf -P -e '{service}/smtpd_tls_security_level=encrypt'" in out
    assert "smtpd_recipient_restrictions lacks check_policy_service" in out
    assert "virtual_mailbox_domains lacks new.example" in out
    assert "4 problem(s) found" in out


def test_doctor_reports_an_extra_passdb_and_a_wrong_mail_location(wired: Wired) -> None:
    conf = wired.dovecot.config_path
    original = conf.read_text()
    if wired.release.dovecot24:
        broken = f"passdb pam {{\n}}\nmail_home = {wired.root}/vmail/%d/%n\n"
    else:
        broken = "passdb {\n  driver = pam\n}\nmail_location = mbox:~/mail\n"
    try:
        conf.write_text(original + broken)
        result = wired.doctor("--no-postfix")
    finally:
        conf.write_text(original)
    assert result.returncode == 1, result.stdout + result.stderr
    if wired.release.dovecot24:
        assert "dovecot: extra passdb pam { } is consulted too" in result.stdout
        # A 2.3 variable in a 2.4 config: every user would share vmail/%d/%n.
        assert (f"dovecot: mail_home = {wired.root}/vmail/%d/%n: Dovecot 2.4 takes %d, %n "
                "literally") in result.stdout
        assert ("fix: mail_home = " + str(wired.root) + "/vmail/%{user | domain | lower}/"
                "%{user | username | lower}") in result.stdout
    else:
        assert "dovecot: extra passdb { driver = pam } is consulted too" in result.stdout
        assert f"fix: mail_location = maildir:{wired.root}/vmail/%d/%n/Maildir" in result.stdout


def test_doctor_finds_mail_left_under_a_mixed_case_directory(wired: Wired) -> None:
    """Paths are lower-case now: mail an earlier version wrote to .../Mixed/ is named, with the mv."""
    from mailplugins.hashing import hash_password

    store = wired.daemons.store
    store.add_mailbox("Mixed@example.org", hash_password("x", wired.daemons.config.passwords))
    old = wired.root / "vmail" / "example.org" / "Mixed"
    (old / "Maildir" / "new").mkdir(parents=True)
    try:
        result = wired.doctor("--no-postfix")
    finally:
        shutil.rmtree(old)
        store.remove_mailbox("Mixed@example.org")
    assert result.returncode == 1, result.stdout + result.stderr
    new = wired.root / "vmail" / "example.org" / "mixed"
    assert (f"mailboxes: Mixed@example.org: mail in {old} is no longer read (paths are "
            f"lower-case: {new})\n    fix: mv {old} {new}\n") in result.stdout
    assert "1 problem(s) found" in result.stdout


def test_doctor_names_a_missing_tool_config_cleanly(wired: Wired, tmp_path: Path) -> None:
    result = wired.doctor("--no-dovecot", "--postfix-config-dir", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr.startswith("mailplugins: postconf")
    assert "Traceback" not in result.stderr


@pytest.fixture(params=["postgresql", "mysql"])
def server_database(request: pytest.FixtureRequest) -> Iterator[str]:
    from tests.conftest import MYSQL_ADMIN_URL, PG_ADMIN_URL, _server_database

    admin = PG_ADMIN_URL if request.param == "postgresql" else MYSQL_ADMIN_URL
    yield from _server_database(admin, request.param)


def test_sql_domains_map_answers_from_the_database(server_database: str, tmp_path: Path) -> None:
    """The generated proxy:pgsql:/proxy:mysql: map, queried by Postfix's own map client."""
    from mailplugins.config import parse_config
    from mailplugins.db import schema
    from mailplugins.db.engine import make_engine
    from mailplugins.store import Store

    config = parse_config({"database": {"url": server_database},
                           "deliver": {"listen": "unix:/var/spool/postfix/private/mailplugins-deliver"}})
    engine = make_engine(config.database)
    try:
        schema.upgrade(engine)
        Store(engine).add_domain("example.org")
        snippet = postfix_config(config, PostfixOptions(config_directory=str(tmp_path)))
        assert snippet.domains_mode == "sql"
        (query,) = snippet.files
        Path(query.path).write_text(query.text)
        table = snippet.main_dict()["virtual_mailbox_domains"].removeprefix("proxy:")
        etc = tmp_path / "etc"
        etc.mkdir()
        (etc / "main.cf").write_text("compatibility_level = 3.6\nmeta_directory = /etc/postfix\n")

        def postmap(key: str) -> subprocess.CompletedProcess[str]:
            return run(["postmap", "-c", str(etc), "-q", key, table], check=False)

        found = postmap("example.org")
        assert (found.returncode, found.stdout) == (0, "example.org\n"), found.stderr
        missing = postmap("other.example")
        assert (missing.returncode, missing.stdout) == (1, ""), missing.stderr
        Store(engine).add_domain("new.example")  # live: no regeneration needed
        assert postmap("new.example").stdout == "new.example\n"
    finally:
        engine.dispose()


def test_doctor_probe_finds_the_daemons_where_postfix_and_dovecot_look(wired: Wired) -> None:
    before = wired.doctor("--probe")
    assert before.returncode == 1
    assert before.stdout.count("daemons: ") == 5, before.stdout
    assert f"deliver.listen: nothing answers at {wired.postfix.queue_dir}/private/mailplugins-deliver" \
        in before.stdout
    wired.daemons.start()
    try:
        # As the shipped socket unit makes it (authd's own unix: listener cannot set a group).
        shutil.chown(wired.root / "dict.sock", group="dovecot")
        after = wired.doctor("--probe")
    finally:
        wired.daemons.stop()
    assert after.returncode == 0, after.stdout + after.stderr + wired.daemons.output()[-2000:]
    assert after.stdout.startswith("OK: postfix, dovecot and the daemons' sockets wired as")


def test_lua_variant_authenticates_through_authd(wired: Wired) -> None:
    """dovecot-config --lua in a running Dovecot: logins are verified by authd over HTTP."""
    from mailplugins.hashing import hash_password

    store = wired.daemons.store
    if store.get_mailbox("lua@example.org") is None:
        store.add_mailbox("lua@example.org", hash_password("lua secret", wired.daemons.config.passwords))
    script = REPO / "authd" / "lua" / "mailplugins-auth.lua"
    etc = wired.root / "lua-etc"
    etc.mkdir(exist_ok=True)
    snippet = dovecot_config(wired.daemons.config, DovecotOptions(
        config_directory=str(etc), lua=True, lua_script=str(script),
        lua_script_text=script.read_text(), tls_cert=str(wired.cert), tls_key=str(wired.key),
        version=dovecot_release(wired.release),
    ))
    for generated in snippet.files:
        Path(generated.path).write_text(generated.text)
    dovecot = Dovecot(wired.root / "lua", conf=dovecot_conf_text(snippet), release=wired.release)
    field = "protocol=imap" if wired.release.dovecot24 else "service=imap"
    wired.daemons.start()
    try:
        dovecot.start()
        good = dovecot.doveadm("auth", "test", "-x", field, "lua@example.org", "lua secret")
        bad = dovecot.doveadm("auth", "test", "-x", field, "lua@example.org", "wrong")
    finally:
        dovecot.stop()
        wired.daemons.stop()
    assert good.returncode == 0, good.stdout + good.stderr + dovecot.log_text()[-2000:]
    assert "auth succeeded" in good.stdout
    assert bad.returncode == 77, bad.stdout + bad.stderr


# -- the generated snippet in each release's own stock Debian configuration ----------------------


def stock_dovecot_etc(release: Release, target: Path) -> Path:
    """Debian's packaged /etc/dovecot of ``release``, copied, with the system passdb left out
    (as wiring.md says to) and conf.d included from the copy: the operator's starting point."""
    shutil.copytree(release.path("/etc/dovecot"), target, symlinks=True)
    conf = target / "dovecot.conf"
    conf.write_text(conf.read_text().replace("!include conf.d/", f"!include {target}/conf.d/"))
    auth = target / "conf.d" / "10-auth.conf"
    auth.write_text(auth.read_text().replace("\n!include auth-system.conf.ext",
                                             "\n#!include auth-system.conf.ext"))
    return conf


def test_generated_snippet_passes_doveconf_without_a_warning(release: Release) -> None:
    root = short_tempdir("mp-gen-conf-")
    try:
        etc = root / "dovecot"
        conf = stock_dovecot_etc(release, etc)
        cert, key = make_cert(root)
        script = root / "mailplugins-auth.lua"
        script.write_text((REPO / "authd" / "lua" / "mailplugins-auth.lua").read_text())
        daemons = Daemons(root / "mp", {
            "mail": {"location": f"{root}/vmail/%d/%n/Maildir", "uid": 5000, "gid": 5000},
            "authd": {"sasl_listen": f"unix:{root}/auth.sock", "dict_listen": f"unix:{root}/dict.sock",
                      "http_listen": "tcp:9643:interface=127.0.0.1"},
            "deliver": {"listen": f"unix:{root}/lmtp.sock"},
        })
        snippet = dovecot_config(daemons.config, DovecotOptions(
            version=dovecot_release(release), config_directory=str(etc), lua=True, lua_script=str(script),
            lua_script_text=script.read_text(), tls_cert=str(cert), tls_key=str(key),
        ))
        assert snippet.warnings == ()
        (etc / "conf.d" / "99-mailplugins.conf").write_text(dovecot_conf_text(snippet))
        for generated in snippet.files:
            Path(generated.path).write_text(generated.text)
        shown = run(release.command(["doveconf", "-c", str(conf), "-n"]), check=False)
        assert shown.returncode == 0, shown.stderr
        assert shown.stderr == "", shown.stderr  # not one warning
        if release.dovecot24:
            body = [line for line in shown.stdout.splitlines() if not line.startswith("#")]
            assert body[0] == "dovecot_config_version = 2.4.0"
            assert f"passdb lua {{\n  lua_file = {script}\n}}" in shown.stdout
            assert f"userdb lua {{\n  lua_file = {script}\n}}" in shown.stdout
            assert ("mail_home = " + str(root) + "/vmail/%{user | domain | lower}/"
                    "%{user | username | lower}\n") in shown.stdout
            assert "passdb pam" not in shown.stdout and "userdb passwd" not in shown.stdout
            # Debian's /var/mail/%{user} is replaced: INBOX is the Maildir deliver writes to.
            assert ("mail_inbox_path = " + str(root) + "/vmail/%{user | domain | lower}/"
                    "%{user | username | lower}/Maildir\n") in shown.stdout
        else:
            assert f"mail_location = maildir:{root}/vmail/%d/%n/Maildir\n" in shown.stdout
            assert "  driver = lua\n" in shown.stdout
        # doctor finds nothing wrong with what the generator wrote, reading that release's doveconf.
        tools = tool_dir(release, root / "bin")
        env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"}
        doctor = subprocess.run(
            [sys.executable, "-m", "mailplugins.cli", "--config", str(daemons.config_path), "doctor",
             "--no-postfix", "--dovecot-config", str(conf), "--dovecot-directory", str(etc),
             "--lua", "--lua-script", str(script), "--tls-cert", str(cert), "--tls-key", str(key)],
            capture_output=True, text=True, cwd=REPO, timeout=120, check=False, env=env,
        )
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert doctor.stdout.startswith("OK: dovecot wired as")
        # A 2.3-style path in a 2.4 configuration: taken literally by 2.4, flagged by doctor.
        if release.dovecot24:
            with (etc / "conf.d" / "99-mailplugins.conf").open("a") as handle:
                handle.write(f"mail_home = {root}/vmail/%d/%n\n")
            doctor = subprocess.run(doctor.args, capture_output=True, text=True, cwd=REPO,
                                    timeout=120, check=False, env=env)
            assert doctor.returncode == 1, doctor.stdout + doctor.stderr
            assert f"mail_home = {root}/vmail/%d/%n: Dovecot 2.4 takes %d, %n literally" \
                in doctor.stdout
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_dovecot24_config_refuses_an_untranslatable_location(tmp_path: Path) -> None:
    """One line naming mail.location, exit 2: never a config 2.4 would take literally."""
    config = tmp_path / "mailplugins.yaml"
    config.write_text(f"database: {{url: 'sqlite:///{tmp_path}/m.db'}}\n"
                      "mail: {location: '/var/vmail/x%%n/%n'}\n"
                      "authd: {http_listen: 'tcp:9643:interface=127.0.0.1'}\n")
    result = subprocess.run(
        [sys.executable, "-m", "mailplugins.cli", "--config", str(config), "dovecot-config",
         "--dovecot-version", "2.4"], capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("mailplugins: mail.location: ")
    assert result.stderr.count("\n") == 1
