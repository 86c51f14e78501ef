"""authd.dict: passdb/userdb answers and reply order, over a StringTransport."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from authd.dict import DictBackend, DictFactory, split_key, userdb_fields
from authd.metrics import AuthdMetrics
from mailplugins.config import parse_config
from mailplugins.db import schema
from mailplugins.db.engine import make_engine
from mailplugins.metrics import DaemonMetrics
from mailplugins.store import Store

HELLO = b"H3\t2\t0\t\tauth\n"


class Rig:
    def __init__(self, location: str = "/srv/vmail/%d/%n/Maildir") -> None:
        self.config = parse_config({
            "database": {"url": "sqlite://"},
            "mail": {"location": location, "uid": 5000, "gid": 5001},
            "authd": {"dict_listen": "tcp:0:interface=127.0.0.1"},
        })
        engine = make_engine(self.config.database)
        schema.upgrade(engine)
        self.store = Store(engine)
        self.store.add_domain("example.org")
        self.store.add_mailbox("Alice@example.org", "{PLAIN}x", quota_bytes=1000)
        self.store.add_mailbox("bob@example.org", "{PLAIN}y", services=["imap"])
        self.store.add_mailbox("carol@example.org", "{PLAIN}z")
        self.store.set_enabled("carol@example.org", False)
        self.backend = DictBackend(self.store, self.config)
        self.pending: list[tuple[Deferred[Any], Callable[..., Any], tuple[Any, ...]]] = []
        self.hold = False
        self.clock = Clock()
        self.metrics = DaemonMetrics("authd")
        assert self.config.authd is not None
        self.factory = DictFactory(
            backend=self.backend, db_run=self.db_run, timeout=2.0, clock=self.clock,
            config=self.config.authd, metrics=AuthdMetrics(self.metrics),
        )
        self.protocol = self.factory.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def db_run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if not self.hold:
            return maybeDeferred(fn, *args)
        d: Deferred[Any] = Deferred()
        self.pending.append((d, fn, args))
        return d

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"mailplugins_authd_{name}", labels)
        return value or 0.0

    def send(self, data: bytes) -> bytes:
        self.transport.clear()
        self.protocol.dataReceived(data)
        value: bytes = self.transport.value()
        return value


def test_userdb_lookup_matches_deliver_layout() -> None:
    rig = Rig()
    reply = rig.send(HELLO + b"Lshared/userdb/alice@EXAMPLE.org\talice@EXAMPLE.org\n")
    assert reply.startswith(b"O") and reply.endswith(b"\n")
    # The mailbox is stored as Alice@: the path and the user name are the lower-case spelling.
    assert json.loads(reply[1:]) == {
        "user": "alice@example.org",
        "home": "/srv/vmail/example.org/alice",
        "mail": "maildir:/srv/vmail/example.org/alice/Maildir",
        "uid": 5000,
        "gid": 5001,
        "quota_rule": "*:bytes=1000",
    }


def test_userdb_for_dovecot24_and_the_user_list() -> None:
    """What POST /userdb and POST /users answer (the Lua userdb on Dovecot 2.4)."""
    rig = Rig()
    backend = rig.protocol.factory.backend
    assert backend.userdb("ALICE@example.org", "2.4") == {
        "user": "alice@example.org",
        "home": "/srv/vmail/example.org/alice",
        "mail_driver": "maildir",
        "mail_path": "/srv/vmail/example.org/alice/Maildir",
        "mail_inbox_path": "/srv/vmail/example.org/alice/Maildir",
        "uid": 5000,
        "gid": 5001,
        "quota_storage_size": "1000",
    }
    assert backend.userdb("carol@example.org", "2.4") is None  # disabled
    assert backend.userdb("nobody@example.org", "2.4") is None
    assert backend.userdb("not an address", "2.4") is None
    assert "alice@example.org" in backend.users()
    assert "carol@example.org" not in backend.users()


def test_passdb_lookup() -> None:
    rig = Rig()
    reply = rig.send(HELLO + b"Lshared/passdb/alice@example.org\talice@example.org\n")
    assert json.loads(reply[1:]) == {"password": "{PLAIN}x", "user": "alice@example.org"}


def test_not_found_disabled_and_service_denied() -> None:
    rig = Rig()
    assert rig.send(HELLO + b"Lshared/passdb/nobody@example.org\tx\n") == b"N\n"
    assert rig.send(b"Lshared/passdb/carol@example.org\tx\n") == b"N\n"
    assert rig.send(b"Lshared/userdb/carol@example.org\tx\n") == b"N\n"
    assert rig.send(b"Lshared/passdb/smtp/bob@example.org\tx\n") == b"N\n"
    assert rig.send(b"Lshared/passdb/imap/bob@example.org\tx\n").startswith(b"O{")
    assert rig.send(b"Lpriv/quota/storage\tx\n") == b"N\n"
    assert rig.send(b"Lshared/userdb/not-an-address\tx\n") == b"N\n"


def test_replies_stay_in_order() -> None:
    rig = Rig()
    rig.hold = True
    rig.send(HELLO + b"Lshared/passdb/nobody@example.org\tx\nLshared/passdb/alice@example.org\tx\n"
             b"B1\tx\nC1\n")
    assert rig.transport.value() == b""
    second = rig.pending[1]
    second[0].callback(second[1](*second[2]))
    assert rig.transport.value() == b""
    first = rig.pending[0]
    first[0].callback(first[1](*first[2]))
    lines = rig.transport.value().split(b"\n")
    assert lines[0] == b"N"
    assert lines[1].startswith(b'O{"password"')
    assert lines[2] == b"O1"
    assert rig.metric("dict_requests_total", command="lookup", result="not_found") == 1
    assert rig.metric("dict_requests_total", command="lookup", result="found") == 1
    assert rig.metric("dict_requests_total", command="commit", result="ok") == 1


def test_iterate_lists_enabled_users() -> None:
    rig = Rig()
    reply = rig.send(HELLO + b"I0\t0\tshared/userdb/\t*\n")
    lines = reply.split(b"\n")
    assert [line.split(b"\t")[0] for line in lines[:-2]] == [
        b"Oshared/userdb/alice@example.org", b"Oshared/userdb/bob@example.org",
    ]
    assert lines[-2:] == [b"", b""]
    reply = rig.send(b"I8\t1\tshared/userdb/\t*\n")
    assert reply == b"Oshared/userdb/alice@example.org\t\n\n"
    assert rig.metric("dict_requests_total", command="iterate", result="ok") == 2


def test_database_failure_answers_f() -> None:
    rig = Rig()

    def broken(*_: Any) -> Any:
        raise RuntimeError("down")

    rig.factory.backend.lookup = broken  # type: ignore[method-assign,assignment]
    assert rig.send(HELLO + b"Lshared/passdb/alice@example.org\tx\n").startswith(b"F")
    assert not rig.transport.disconnecting
    assert rig.metric("dict_requests_total", command="lookup", result="error") == 1


def test_slow_database_answers_f_after_timeout() -> None:
    rig = Rig()
    rig.hold = True
    rig.send(HELLO + b"Lshared/passdb/alice@example.org\tx\n")
    rig.clock.advance(2.5)
    assert rig.transport.value().startswith(b"F")


def test_transactions() -> None:
    rig = Rig()
    reply = rig.send(HELLO + b"B1\talice@example.org\nS1\tshared/last-login/a\t1\nU1\tk\nC1\n"
                     b"B2\tx\nR2\nC9\n")
    assert reply == b"O1\nF9\tunknown transaction\n"
    assert rig.metric("dict_requests_total", command="commit", result="ok") == 1
    assert rig.metric("dict_requests_total", command="commit", result="error") == 1


def test_last_login_plugin_transactions_record_the_login() -> None:
    rig = Rig()
    reply = rig.send(b"H3\t2\t0\t\tlastlogin\nB1\talice@example.org\n"
                     b"S1\tshared/last-login/alice@example.org\t1763777777\nC1\n"
                     b"B2\tx\nS2\tshared/last-login/nobody@example.org\t1\nS2\tpriv/quota\tx\nC2\n")
    assert reply == b"O1\nO2\n"
    mailbox = rig.store.get_mailbox("alice@example.org")
    assert mailbox is not None
    assert mailbox.last_login_at is not None
    assert int(mailbox.last_login_at.replace(tzinfo=UTC).timestamp()) == 1763777777


def test_protocol_errors_drop() -> None:
    rig = Rig()
    rig.send(b"Lshared/passdb/alice@example.org\n")
    assert rig.transport.disconnecting
    assert rig.metric("protocol_errors_total", protocol="dict") == 1
    rig = Rig()
    rig.send(HELLO + b"S5\tkey\tvalue\n")
    assert rig.transport.disconnecting
    assert rig.metric("protocol_errors_total", protocol="dict") == 1


def test_split_key() -> None:
    assert split_key("shared/passdb/a@b") == ("passdb", None, "a@b")
    assert split_key("shared/passdb/smtp/a@b") == ("passdb", "smtp", "a@b")
    assert split_key("shared/userdb/") is None
    assert split_key("priv/passdb/a@b") is None


def test_unsafe_local_part_gives_no_location() -> None:
    rig = Rig()
    rig.store.add_mailbox('".."@example.org', "{PLAIN}x")
    assert rig.send(HELLO + b'Lshared/userdb/".."@example.org\tx\n') == b"N\n"


def test_userdb_fields_without_maildir_suffix() -> None:
    rig = Rig(location="/srv/vmail/%d/%n")
    mailbox = rig.store.get_mailbox("bob@example.org")
    assert mailbox is not None
    fields = userdb_fields(mailbox, rig.config.mail)
    assert fields["home"] == "/srv/vmail/example.org/bob"
    assert fields["mail"] == "maildir:/srv/vmail/example.org/bob"
    assert "quota_rule" not in fields


def test_master_user_keys() -> None:
    """Dovecot's master passdb (``master = yes``) reads ``master/[<service>/]<user>``."""
    rig = Rig()
    backend = rig.backend
    assert backend.lookup("shared/master/bob@example.org") is None  # not a master user
    rig.store.set_master("bob@example.org", True)
    assert json.loads(backend.lookup("shared/master/BOB@example.org") or "null") == {
        "password": "{PLAIN}y", "user": "bob@example.org"}
    assert backend.lookup("shared/master/imap/bob@example.org") is not None
    # The master's own service flags do not matter (it logs in as someone else)...
    assert backend.lookup("shared/master/pop3/bob@example.org") is not None
    # ... but SMTP is refused unless authd.master_user_smtp, and a disabled master is unknown.
    assert backend.lookup("shared/master/smtp/bob@example.org") is None
    rig.store.set_enabled("bob@example.org", False)
    assert backend.lookup("shared/master/bob@example.org") is None
    # The ordinary passdb key never says who is a master user.
    assert backend.lookup("shared/passdb/alice@example.org") is not None
