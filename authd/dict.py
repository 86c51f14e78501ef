# -*- test-case-name: tests.unit.test_authd_dict -*-
"""Dovecot 2.3's dict passdb/userdb, answered from the mailplugins database.

Keys (with Dovecot's ``shared/`` prefix) are ``passdb/<user>`` and ``userdb/<user>``, optionally
``passdb/<service>/<user>`` when the dict-auth config passes ``%s`` so per-service flags apply.
Disabled mailboxes, and mailboxes whose flags deny the named service, are answered not-found.
The userdb answer is computed with :func:`mailplugins.maildir_path.expand_location`, the same
function deliver writes with, so Dovecot reads exactly where deliver wrote.

Master users (Dovecot's ``passdb { master = yes }``) are ``master/[<service>/]<user>``: the
passdb answer of an enabled mailbox flagged ``master``, not found for any other, and not found
for service ``smtp`` unless ``authd.master_user_smtp`` (so name the service in the key).

Dovecot's last_login plugin may point at the same socket (``last_login_key = last-login/%u``):
its transactions record the mailbox's last login.

Replies leave in the order the commands came (the protocol has no request ids), whatever order
the database answers in.

No idle timeout (Dovecot's dict client keeps its connection and decides when to close it; idle
clients are bounded by ``max_connections``), but a line must arrive whole within
``line_timeout`` of its first byte, so a peer trickling bytes cannot hold a connection forever.
A peer that half-closes gets the replies to its complete commands, then the connection closes.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from authd import dict_codec as codec
from authd.metrics import AuthdMetrics
from authd.sasl_codec import ProtocolError
from mailplugins.addresses import AddressError, parse_address
from mailplugins.config import AuthdConfig, Config, MailConfig
from mailplugins.deadline import Deadline
from mailplugins.maildir_path import canonical, expand_location
from mailplugins.records import MailboxRecord
from mailplugins.store import Store

log = Logger(namespace="authd.dict")

#: Commands waiting for their reply on one connection; more is a client gone mad.
MAX_PIPELINE = 256
#: Services a ``passdb/<service>/<user>`` key may name.
_SERVICE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def canonical_user(mailbox: MailboxRecord) -> str:
    """The one login name Dovecot knows a mailbox by: its address, lower-cased (docs/authd.md)."""
    return canonical(mailbox.address)


def userdb_fields(mailbox: MailboxRecord, mail: MailConfig, release: str = "2.3") -> dict[str, Any]:
    """The userdb answer: where the mail lives, as deliver writes it, and who owns it.

    In Dovecot 2.3's names (``mail = maildir:...``, ``quota_rule``) or 2.4's (``mail_driver``,
    ``mail_path``, ``quota_storage_size``); ``user`` is the canonical (lower-case) login.
    """
    location = expand_location(mail.location, mailbox.local_part, mailbox.domain)
    stripped = location.rstrip("/")
    home = stripped.rsplit("/", 1)[0] if stripped.endswith("/Maildir") else stripped
    fields: dict[str, Any] = {"user": canonical_user(mailbox), "home": home}
    if release == "2.4":
        fields.update({"mail_driver": "maildir", "mail_path": location, "mail_inbox_path": location})
    else:
        fields["mail"] = "maildir:" + location
    fields.update({"uid": mail.uid, "gid": mail.gid})
    if mailbox.quota_bytes > 0:
        if release == "2.4":
            fields["quota_storage_size"] = str(mailbox.quota_bytes)
        else:
            fields["quota_rule"] = f"*:bytes={mailbox.quota_bytes}"
    return fields


def passdb_fields(mailbox: MailboxRecord) -> dict[str, Any]:
    """The passdb answer: Dovecot verifies the ``{SCHEME}`` hash itself; ``user`` canonicalises."""
    return {"password": mailbox.password, "user": canonical_user(mailbox)}


def split_key(key: str) -> tuple[str, str | None, str] | None:
    """``shared/passdb/[svc/]user`` -> (``passdb``, service, user); None for other keys."""
    if not key.startswith("shared/"):
        return None
    kind, _, rest = key[len("shared/"):].partition("/")
    if kind not in ("passdb", "userdb", "master") or not rest:
        return None
    service: str | None = None
    head, slash, tail = rest.partition("/")
    if slash and tail and head and set(head) <= _SERVICE_CHARS and "@" not in head:
        service, rest = head, tail
    return kind, service, rest


def last_login_user(key: str) -> str | None:
    """``shared/last-login/<user>`` (the last_login plugin's default key) -> the user."""
    for prefix in ("shared/last-login/", "shared/last_login/"):
        if key.startswith(prefix) and len(key) > len(prefix):
            return key[len(prefix):]
    return None


class DictBackend:
    """Lookups and iteration as blocking functions (run in the DB pool): store + config in."""

    def __init__(self, store: Store, config: Config) -> None:
        self.store = store
        self.config = config

    def lookup(self, key: str) -> str | None:
        """The JSON value of ``key``, or None (not found, disabled, service denied)."""
        parts = split_key(key)
        if parts is None:
            return None
        kind, service, user = parts
        mailbox = self._enabled_mailbox(user)
        if mailbox is None:
            return None
        if kind == "master":
            if not mailbox.master:
                return None
            smtp_allowed = self.config.authd is not None and self.config.authd.master_user_smtp
            if service == "smtp" and not smtp_allowed:
                return None
            # Dovecot logs "Master user logging in as ..."; authd logs that it answered.
            log.info("master user {master} looked up by Dovecot (service={service})",
                     master=mailbox.address, service=service or "?")
        elif service is not None and not mailbox.allows(service):
            return None
        return self._value(kind, mailbox)

    def _value(self, kind: str, mailbox: MailboxRecord) -> str | None:
        if kind in ("passdb", "master"):
            return json.dumps(passdb_fields(mailbox))
        try:
            return json.dumps(userdb_fields(mailbox, self.config.mail))
        except ValueError as exc:
            log.warn("mailbox {id} has no safe mail location: {error}",
                     id=mailbox.id, error=str(exc))
            return None

    def userdb(self, user: str, release: str) -> dict[str, Any] | None:
        """Dovecot's userdb fields for ``user`` (any spelling), or None (unknown or disabled).

        For the Lua userdb (``POST /userdb``): the same answer as the dict userdb's, in the
        field names of Dovecot ``release``. ValueError when the mailbox has no safe path.
        """
        mailbox = self._enabled_mailbox(user)
        if mailbox is None:
            return None
        return userdb_fields(mailbox, self.config.mail, release)

    def _enabled_mailbox(self, user: str) -> MailboxRecord | None:
        """The enabled mailbox ``user`` names (any spelling); None for anything else (not an
        address, a routing address, unknown, disabled)."""
        try:
            address = parse_address(user)
        except AddressError:
            return None
        if address.routing:
            return None
        mailbox = self.store.get_mailbox(address)
        if mailbox is None or not mailbox.enabled:
            return None
        return mailbox

    def users(self) -> list[str]:
        """Every enabled mailbox's canonical login, for ``doveadm user '*'`` and ``-A``."""
        return [canonical_user(m) for m in self.store.iter_mailboxes() if m.enabled]

    def record_last_login(self, user: str, value: str) -> bool:
        """Store the time Dovecot's last_login plugin reports (unix seconds) for ``user``."""
        try:
            when = datetime.fromtimestamp(int(value), UTC).replace(tzinfo=None)
            address = parse_address(user)
        except (ValueError, OverflowError, OSError):
            return False
        mailbox = self.store.get_mailbox(address)
        if mailbox is None:
            return False
        self.store.record_login(mailbox.id, when)
        return True

    def iterate(self, path: str, flags: int, max_rows: int) -> list[tuple[str, str]]:
        """Rows under ``shared/userdb/`` (or ``passdb/``): every enabled mailbox, in order."""
        if flags & codec.ITERATE_EXACT_KEY:
            value = self.lookup(path)
            return [(path, value)] if value is not None else []
        if path not in ("shared/userdb/", "shared/passdb/", "shared/userdb", "shared/passdb"):
            return []
        kind = "userdb" if "userdb" in path else "passdb"
        prefix = f"shared/{kind}/"
        rows: list[tuple[str, str]] = []
        for mailbox in self.store.iter_mailboxes():
            if not mailbox.enabled:
                continue
            value = "" if flags & codec.ITERATE_NO_VALUE else self._value(kind, mailbox)
            if value is None:
                continue
            rows.append((prefix + canonical_user(mailbox), value))
            if max_rows and len(rows) >= max_rows:
                break
        return rows


class _Slot:
    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: bytes | None = None


@implementer(IHalfCloseableProtocol)
class DictProtocol(Protocol):
    factory: DictFactory
    transport: Any

    def __init__(self, decoder: codec.DictDecoder) -> None:
        self.decoder = decoder
        self._queue: deque[_Slot] = deque()
        self._transactions: dict[int, list[codec.Change]] = {}
        self._deadline = Deadline(self._too_slow)
        self._closed = False
        self._ended = False

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            commands = self.decoder.feed(data)
        except ProtocolError as exc:
            self._drop(str(exc))
            return
        for command in commands:
            if self._closed:
                return
            try:
                self._handle(command)
            except ProtocolError as exc:
                self._drop(str(exc))
        self._deadline.follow_line(
            self.factory.clock, self.factory.config.line_timeout, data=data,
            pending=not (self._closed or self._ended) and self.decoder.pending,
        )

    def _too_slow(self) -> None:
        if not self._closed:
            self._drop(f"line not complete {self.factory.config.line_timeout:g}s after its first byte")

    def _handle(self, command: codec.Command) -> None:
        if isinstance(command, codec.Hello):
            return
        if isinstance(command, codec.Lookup):
            self._answer("lookup", self.factory.backend.lookup, command.key)
        elif isinstance(command, codec.Iterate):
            self._answer("iterate", self.factory.backend.iterate, command.path, command.flags,
                         command.max_rows)
        elif isinstance(command, codec.Begin):
            if command.tid in self._transactions or len(self._transactions) >= 64:
                raise ProtocolError("duplicate or too many transactions")
            self._transactions[command.tid] = []
        elif isinstance(command, codec.Change):
            changes = self._transactions.get(command.tid)
            if changes is None:
                raise ProtocolError(f"change in unknown transaction {command.tid}")
            if len(changes) < 64:
                changes.append(command)
        elif isinstance(command, codec.Rollback):
            self._transactions.pop(command.tid, None)
        elif isinstance(command, codec.Commit):
            slot = self._slot()
            changes = self._transactions.pop(command.tid, None)
            ok = changes is not None
            if changes:
                self._apply(changes)
            self.factory.metrics.dict_requests["commit", "ok" if ok else "error"].inc()
            slot.data = codec.commit_reply(command.tid, ok, "" if ok else "unknown transaction")
            self._flush()

    def _apply(self, changes: list[codec.Change]) -> None:
        """Only Dovecot's last_login plugin writes here: record the login, after the reply.

        Everything else (quota, other plugins' keys) is accepted and dropped, so a misconfigured
        plugin cannot fail logins.
        """
        for change in changes:
            if change.kind not in "ST":
                continue
            login = last_login_user(change.key)
            if login is None:
                continue

            def failed(failure: Failure) -> None:
                log.warn("recording a last login failed: {error}", error=failure.getErrorMessage())

            self.factory.db_run(self.factory.backend.record_last_login, login, change.value).addErrback(
                failed
            )

    def _slot(self) -> _Slot:
        if len(self._queue) >= MAX_PIPELINE:
            raise ProtocolError("too many commands waiting for replies")
        slot = _Slot()
        self._queue.append(slot)
        return slot

    def _answer(self, command: str, fn: Callable[..., Any], *args: Any) -> None:
        slot = self._slot()

        def done(value: Any) -> None:
            if command == "lookup":
                slot.data = codec.NOT_FOUND if value is None else codec.found(value)
                result = "not_found" if value is None else "found"
            else:
                slot.data = codec.iterate_rows(value)
                result = "ok"
            self.factory.metrics.dict_requests[command, result].inc()
            self._flush()

        def failed(failure: Failure) -> None:
            log.error("dict {command} failed: {error}", command=command,
                      error=failure.getErrorMessage())
            self.factory.metrics.dict_requests[command, "error"].inc()
            slot.data = codec.failed("mailplugins database unavailable")
            self._flush()

        d: Deferred[Any] = self.factory.db_run(fn, *args)
        d.addTimeout(self.factory.timeout, self.factory.clock)
        d.addCallbacks(done, failed)

    def _flush(self) -> None:
        while self._queue and self._queue[0].data is not None:
            data = self._queue.popleft().data
            if not self._closed and data is not None:
                self.transport.write(data)
        self._close_if_ended()

    def readConnectionLost(self) -> None:
        """The peer will send nothing more (half-close): reply to what came, then close."""
        self._ended = True
        self._deadline.stop()
        self._close_if_ended()

    def writeConnectionLost(self) -> None:
        self._closed = True
        self.transport.loseConnection()

    def _close_if_ended(self) -> None:
        if self._ended and not self._closed and not self._queue:
            self._closed = True
            self.transport.loseConnection()

    def _drop(self, reason: str) -> None:
        self.factory.metrics.protocol_errors["dict"].inc()
        log.warn("dropping dict connection: {reason}", reason=reason)
        self._closed = True
        self._deadline.stop()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._closed = True
        self._deadline.stop()


class DictFactory(Factory):
    noisy = False

    def __init__(
        self,
        *,
        backend: DictBackend,
        db_run: Callable[..., Deferred[Any]],
        timeout: float,
        clock: Any,
        config: AuthdConfig,
        metrics: AuthdMetrics,
    ) -> None:
        self.backend = backend
        self.db_run = db_run
        self.timeout = timeout
        self.clock = clock
        self.config = config
        self.metrics = metrics

    def buildProtocol(self, addr: IAddress | None) -> Any:
        protocol = DictProtocol(codec.DictDecoder(max(self.config.max_line_length, 4096)))
        protocol.factory = self
        return protocol
