"""authd.http: the verify endpoint over a real HTTPChannel, including Expect: 100-continue."""

from __future__ import annotations

from urllib.parse import urlencode

from twisted.internet.testing import StringTransport

from authd.http import VerifySite
from tests.unit.test_authd_verify import Rig


def connect(rig: Rig, max_body: int = 16384) -> tuple[object, StringTransport]:
    site = VerifySite(rig.verifier, 0.0, max_body)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def post(fields: dict[str, str], expect: bool = False) -> tuple[bytes, bytes]:
    body = urlencode(fields).encode()
    head = (
        b"POST /verify HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        + f"Content-Length: {len(body)}\r\n".encode()
        + (b"Expect: 100-continue\r\n" if expect else b"")
        + b"\r\n"
    )
    return head, body


def status(rig: Rig, fields: dict[str, str]) -> int:
    channel, transport = connect(rig)
    head, body = post(fields)
    channel.dataReceived(head + body)  # type: ignore[attr-defined]
    rig.clock.advance(0.1)
    return int(transport.value().split(b" ", 2)[1])


def test_statuses() -> None:
    rig = Rig()
    rig.store.add_mailbox("carol@example.org", rig.hash("pw"))
    rig.store.set_enabled("carol@example.org", False)
    base = {"service": "imap", "rip": "", "secured": ""}
    assert status(rig, {**base, "user": "alice@example.org", "password": "s3cret"}) == 200
    assert status(rig, {**base, "user": "alice@example.org", "password": "bad"}) == 403
    assert status(rig, {**base, "user": "nobody@example.org", "password": "x"}) == 404
    assert status(rig, {**base, "user": "carol@example.org", "password": "pw"}) == 423
    assert status(rig, {**base, "user": "alice@example.org"}) == 400
    rig.db_down = True
    rig.clock.advance(10)
    assert status(rig, {**base, "user": "alice@example.org", "password": "s3cret"}) == 503


def test_expect_100_continue_is_answered_before_the_body() -> None:
    rig = Rig()
    channel, transport = connect(rig)
    head, body = post({"user": "alice@example.org", "password": "s3cret", "service": "imap"}, True)
    channel.dataReceived(head)  # type: ignore[attr-defined]
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(body)  # type: ignore[attr-defined]
    assert b"HTTP/1.1 200 OK" in transport.value()


def test_oversized_body_is_refused() -> None:
    rig = Rig()
    channel, transport = connect(rig, max_body=1024)
    head, body = post({"user": "alice@example.org", "password": "x" * 5000})
    channel.dataReceived(head + body)  # type: ignore[attr-defined]
    assert transport.disconnecting or transport.disconnected
    assert b"200" not in transport.value()


def test_get_is_refused() -> None:
    rig = Rig()
    channel, transport = connect(rig)
    channel.dataReceived(b"GET /verify HTTP/1.1\r\nHost: x\r\n\r\n")  # type: ignore[attr-defined]
    assert transport.value().startswith(b"HTTP/1.1 405")


def test_oversized_chunked_body_is_refused() -> None:
    rig = Rig()
    channel, transport = connect(rig, max_body=1024)
    chunk = b"a" * 800
    data = (
        b"POST /verify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
        + (f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n") * 3
        + b"0\r\n\r\n"
    )
    channel.dataReceived(data)  # type: ignore[attr-defined]
    assert transport.disconnecting or transport.disconnected
    assert b"HTTP/1.1" not in transport.value()


def lookup_site(rig: Rig) -> VerifySite:
    from authd.dict import DictBackend
    from mailplugins.config import parse_config

    config = parse_config({"database": {"url": "sqlite://"},
                           "mail": {"location": "/srv/vmail/%d/%n/Maildir", "uid": 5000, "gid": 5001},
                           "authd": {"http_listen": "tcp:0:interface=127.0.0.1"}})
    return VerifySite(rig.verifier, 0.0, 16384, reactor=rig.clock,
                      backend=DictBackend(rig.store, config), db_run=rig.db_run, db_timeout=2.0)


def ask(site: VerifySite, path: str, fields: dict[str, str]) -> tuple[int, bytes]:
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    body = urlencode(fields).encode()
    channel.dataReceived(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    )
    head, _, rest = transport.value().partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), rest


def test_userdb_answers_the_lua_userdb_in_each_release_s_names() -> None:
    rig = Rig()
    rig.store.add_mailbox("Bob@example.org", rig.hash("pw"), quota_bytes=2048)
    site = lookup_site(rig)
    code, body = ask(site, "/userdb", {"user": "BOB@example.org", "dovecot": "2.4"})
    assert code == 200
    assert body.decode().split("\n") == [
        "user=bob@example.org", "home=/srv/vmail/example.org/bob", "mail_driver=maildir",
        "mail_path=/srv/vmail/example.org/bob/Maildir",
        "mail_inbox_path=/srv/vmail/example.org/bob/Maildir", "uid=5000", "gid=5001",
        "quota_storage_size=2048", "",
    ]
    code, body = ask(site, "/userdb", {"user": "bob@example.org", "dovecot": "2.3"})
    assert b"mail=maildir:/srv/vmail/example.org/bob/Maildir\n" in body
    assert b"quota_rule=*:bytes=2048\n" in body
    assert ask(site, "/userdb", {"user": "nobody@example.org"})[0] == 404
    assert ask(site, "/userdb", {"dovecot": "2.4"})[0] == 400
    assert ask(site, "/userdb", {"user": "bob@example.org", "dovecot": "3.0"})[0] == 400


def test_users_lists_every_enabled_mailbox() -> None:
    rig = Rig()
    rig.store.add_mailbox("Bob@example.org", rig.hash("pw"))
    rig.store.add_mailbox("carol@example.org", rig.hash("pw"))
    rig.store.set_enabled("carol@example.org", False)
    code, body = ask(lookup_site(rig), "/users", {})
    assert (code, body) == (200, b"alice@example.org\nbob@example.org\n")


def test_lookups_tempfail_when_the_database_is_down() -> None:
    rig = Rig()
    site = lookup_site(rig)
    rig.db_down = True
    assert ask(site, "/userdb", {"user": "alice@example.org"})[0] == 503
    assert ask(site, "/users", {})[0] == 503


def test_master_user_login_through_authzid() -> None:
    """The Lua master passdb sends Dovecot's login_user as authzid."""
    rig = Rig()
    rig.store.add_mailbox("admin@example.org", rig.hash("master-pw"))
    master = {"user": "admin@example.org", "password": "master-pw", "service": "imap",
              "authzid": "alice@example.org"}
    assert status(rig, master) == 403  # not a master user yet
    rig.store.set_master("admin@example.org", True)
    rig.clock.advance(10)  # past lookup_cache_ttl
    assert status(rig, master) == 200
    assert status(rig, {**master, "authzid": "nobody@example.org"}) == 404
    assert status(rig, {**master, "service": "smtp"}) == 403
    assert rig.metric("master_logins_total") == 1
