# -*- test-case-name: tests.unit.test_authd_verify -*-
"""Deciding whether a login and password are good, for every authd front end.

Postfix (auth-client protocol) and Dovecot's Lua passdb (HTTP) both end up here. The rules:

- The mailbox and its app passwords come from the database (through the DB pool); hashes are
  checked in the CPU pool, never on the reactor. The main password is tried first, then each
  app password that allows the service.
- A mailbox whose flags deny the service fails without hashing; a disabled mailbox is reported
  as disabled only to a client that knew the password (nobody learns an account's state by
  guessing).
- Successes are cached for ``cache_ttl`` under an HMAC of (mailbox, password version, password)
  with a per-process random key, so a mail client's reconnect burst costs one hash and a
  password change (which bumps the version) invalidates every entry at once.
- Brute force: each failure is delayed by ``failure_delay``; failures are counted per client
  network and per login, and past ``penalty_threshold`` every later request is delayed by a
  penalty doubling up to ``penalty_max`` (Dovecot's anvil does the same). Retrying the same
  wrong password (a client with a stale password) does not grow the penalty. Trusted networks are
  neither counted nor delayed. Every delay is clamped so the answer leaves before
  ``request_timeout``, itself under Postfix's 10 s.
- Mailbox records are kept ``lookup_cache_ttl`` (default 5 s) so a burst of logins costs one
  database read; a password change, disable or revoke applies within that time.
- Last login and rehashing happen after the answer, never delaying it.
- Logins are refused, as by stock Dovecot, when they hold a character outside
  ``username_chars`` (Dovecot's ``auth_username_chars``: spaces, quotes, non-ASCII...); an empty
  password is refused (an account whose stored hash is of the empty string can never log in,
  and ``user import`` says so); a password over MAX_PASSWORD_BYTES is refused without hashing.
- Master users: a mailbox flagged ``master`` may log in as any other enabled mailbox with its
  own password, named through the PLAIN authzid or ``user<separator>master``; never on SMTP
  unless ``master_user_smtp``; every use is logged.

Counters live in memory, per process (see docs/authd.md for several hosts).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from authd import failures
from authd.caches import Loaded, RecordCache, SuccessCache
from authd.logins import Verdict, VerifyRequest, bad_username, printable, split_login
from authd.metrics import AuthdMetrics
from authd.sasl_codec import Outcome
from authd.shared_writes import SharedWrites
from authd.throttle import Throttle, network_key
from mailplugins.addresses import AddressError, parse_address
from mailplugins.clients import client_in
from mailplugins.config import AuthdConfig, PasswordConfig
from mailplugins.hashing import HashError, check_password, split_scheme, verify_password
from mailplugins.records import AppPasswordRecord, MailboxRecord, utcnow
from mailplugins.store import Store
from mailplugins.threads import RunInPool

log = Logger(namespace="authd.verify")

T = TypeVar("T")

#: Do not write last_login_at more often than this per mailbox (a reconnect storm is one login).
LAST_LOGIN_GRANULARITY = timedelta(seconds=60)
#: Room left between the last deliberate delay and the request deadline.
DEADLINE_MARGIN = 0.25
#: Seconds another host's failure counts are reused before they are read again.
SHARED_COUNT_TTL = 2.0
#: The shared counters are a second line of defence: reading them may cost a login this much at
#: most, and after a failed read they are left alone for SHARED_RETRY seconds.
SHARED_READ_BUDGET = 0.25
SHARED_RETRY = 10.0


#: Longest password checked: passlib refuses more, and no real password comes near it.
MAX_PASSWORD_BYTES = 4096


_thread_state = threading.local()


def _lower_thread_priority(niceness: int) -> None:
    """Renice the current pool thread once: when hashes saturate the cores, the reactor (cache
    hits, dict lookups, replies) still gets the CPU first. Linux applies nice values per thread.
    """
    if not niceness or threading.current_thread() is threading.main_thread():
        return
    if getattr(_thread_state, "niceness", 0) == niceness:
        return
    _thread_state.niceness = niceness
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)


# -- the verifier -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Match:
    """What the hash worker found: the main password (with an optional rehash) or an app one."""

    app_password_id: int | None
    new_hash: str | None = None
    scheme: str = ""


@dataclass(frozen=True)
class VerifierState:
    """Everything a reload replaces, swapped as one reference; a verification reads it once at
    its start and finishes on it, whatever reloads happen while it waits."""

    config: AuthdConfig
    passwords: PasswordConfig
    cache: SuccessCache
    records: RecordCache
    throttle: Throttle


class Verifier:
    """Turns a :class:`VerifyRequest` into a :class:`Verdict`; the Deferred never fails."""

    def __init__(
        self,
        *,
        clock: Any,
        store: Store,
        db_run: RunInPool,
        cpu_run: RunInPool,
        config: AuthdConfig,
        passwords: PasswordConfig,
        metrics: AuthdMetrics,
        wallclock: Callable[[], datetime] = utcnow,
        secret: bytes | None = None,
        db_timeout: float | None = None,
        shared_writes: SharedWrites | None = None,
    ) -> None:
        self.clock: Any = clock
        self.db_timeout = db_timeout
        self.store = store
        self._db_run = db_run
        self._cpu_run = cpu_run
        self.metrics = metrics
        self.wallclock = wallclock
        #: The injected cache key (tests); kept so a reload's new cache uses it too.
        self._cache_secret = secret
        self.state = VerifierState(
            config, passwords, SuccessCache(config.cache_ttl, config.cache_size, secret),
            RecordCache(config.lookup_cache_ttl, config.cache_size), self._new_throttle(config),
        )
        self._fingerprint_key = secret or os.urandom(32)
        self.shared_counts = failures.CountCache(SHARED_COUNT_TTL, config.penalty_table_size)
        self._shared_unavailable_until = 0.0
        #: Shared-counter writes go their own way (authd/shared_writes.py), never in db_run.
        self.shared_writes = shared_writes or SharedWrites(
            db_run, store.engine, metrics.shared_writes)

    @staticmethod
    def _new_throttle(config: AuthdConfig) -> Throttle:
        return Throttle(
            threshold=config.penalty_threshold,
            initial=config.penalty_initial,
            maximum=config.penalty_max,
            window=config.penalty_window,
            size=config.penalty_table_size,
        )

    @property
    def config(self) -> AuthdConfig:
        return self.state.config

    @property
    def cache(self) -> SuccessCache:
        return self.state.cache

    def reload(self, config: AuthdConfig, passwords: PasswordConfig) -> None:
        """New settings as one new state; counters and cached successes stay unless their
        sizing changed; cached records are dropped (they may hold what the reload is about)."""
        old = self.state
        cache = old.cache
        if (config.cache_ttl, config.cache_size) != (old.config.cache_ttl, old.config.cache_size):
            cache = SuccessCache(config.cache_ttl, config.cache_size, self._cache_secret)
        throttle = old.throttle
        if (
            config.penalty_threshold, config.penalty_initial, config.penalty_max,
            config.penalty_window, config.penalty_table_size,
        ) != (
            old.config.penalty_threshold, old.config.penalty_initial, old.config.penalty_max,
            old.config.penalty_window, old.config.penalty_table_size,
        ):
            throttle = self._new_throttle(config)
        records = RecordCache(config.lookup_cache_ttl, config.cache_size)
        self.state = VerifierState(config, passwords, cache, records, throttle)

    def trusted(self, remote_ip: str | None) -> bool:
        return client_in(remote_ip, self.state.config.trusted_networks)

    def verify(
        self, request: VerifyRequest, failure_delay: float | None = None
    ) -> Deferred[Verdict]:
        """Answer within ``request_timeout``: a verdict, or TEMPFAIL if the backend is too slow."""
        state = self.state
        start = self.clock.seconds()
        deadline = start + state.config.request_timeout
        delay = state.config.failure_delay if failure_delay is None else failure_delay
        result: Deferred[Verdict] = Deferred()
        delayed = [0.0]

        def answer(verdict: Verdict) -> None:
            if result.called:
                return
            if timer.active():
                timer.cancel()
            label = {Outcome.OK: "success", Outcome.TEMPFAIL: "tempfail"}.get(
                verdict.outcome, "failure"
            )
            self.metrics.auth_requests[request.mechanism, label].inc()
            elapsed = self.clock.seconds() - start - delayed[0]
            self.metrics.auth_duration[request.mechanism, label].observe(max(elapsed, 0.0))
            result.callback(verdict)

        def too_slow() -> None:
            log.warn("verification for service {service} not finished in time: temporary failure",
                     service=request.service)
            answer(Verdict(Outcome.TEMPFAIL))

        def failed(failure: Failure) -> None:
            log.failure("verification failed unexpectedly", failure)
            answer(Verdict(Outcome.TEMPFAIL))

        timer = self.clock.callLater(state.config.request_timeout, too_slow)
        work = self._verify(request, state, deadline, delay, delayed)
        work.addCallbacks(answer, failed)
        return result

    def _sleep(self, seconds: float, deadline: float, delayed: list[float]) -> Deferred[None]:
        seconds = min(seconds, deadline - DEADLINE_MARGIN - self.clock.seconds())
        if seconds <= 0:
            return succeed(None)
        delayed[0] += seconds
        return deferLater(self.clock, seconds, lambda: None)

    def _fingerprint(self, request: VerifyRequest) -> bytes:
        message = request.user.casefold().encode("utf-8") + b"\0" + request.password.encode("utf-8")
        return hmac.new(self._fingerprint_key, message, hashlib.sha256).digest()[:16]

    @inlineCallbacks
    def _verify(
        self, request: VerifyRequest, state: VerifierState, deadline: float, failure_delay: float,
        delayed: list[float],
    ) -> Generator[Deferred[Any], Any, Verdict]:
        trusted = client_in(request.remote_ip, state.config.trusted_networks)
        keys: list[str] = []
        shared: dict[str, int] = {}
        if not trusted:
            ip_key = network_key(request.remote_ip, state.config.penalty_ipv6_prefix)
            if ip_key:
                keys.append(ip_key)
            keys.append("user:" + request.user.casefold())
            if state.config.penalty_shared:
                shared = yield self._shared_counts(keys, state)
            penalty = state.throttle.penalty(keys, self.clock.seconds(), shared)
            if penalty > 0:
                self.metrics.penalties.inc()
                self.metrics.penalty_seconds.inc(penalty)
                yield self._sleep(penalty, deadline, delayed)
        decided_from = self.clock.seconds()
        verdict: Verdict = yield self._decide(request, state)
        if verdict.outcome in (Outcome.FAIL, Outcome.UNKNOWN, Outcome.DISABLED):
            log.info(
                "authentication failed: user={user} rip={rip} service={service} "
                "mechanism={mechanism}: {reason}",
                user=printable(request.user), rip=printable(request.remote_ip or ""),
                service=printable(request.service), mechanism=request.mechanism,
                reason=verdict.reason,
            )
            if keys:
                fingerprint = self._fingerprint(request)
                state.throttle.failure(keys, fingerprint, self.clock.seconds())
                if state.config.penalty_shared:
                    self._share_failure(keys, fingerprint, state)
                # Every failure is answered failure_delay after it was looked at, whether a hash
                # was computed or not, so the timing tells nothing about which logins exist.
                # Trusted clients (webmail...) get the answer at once.
                remaining = decided_from + failure_delay - self.clock.seconds()
                yield self._sleep(remaining, deadline, delayed)
        elif verdict.outcome is Outcome.OK and keys:
            state.throttle.success(keys[-1])
            if shared.get(keys[-1]):  # the login had failures on record: forgive them
                self.shared_counts.forget(keys[-1])
                self.shared_writes.clear(keys[-1])
        return verdict

    def _shared_counts(self, keys: list[str], state: VerifierState) -> Deferred[dict[str, int]]:
        """Other hosts' failure counts for ``keys``, through a short cache; on a slow or failed
        database read the local counters decide alone (never a delayed login)."""
        now = self.clock.seconds()
        missing = self.shared_counts.missing(keys, now)
        if not missing or now < self._shared_unavailable_until:
            return succeed(self.shared_counts.counts(keys, now))
        window = int(state.config.penalty_window)
        read: Deferred[dict[str, int]] = self._db_run(
            failures.failure_counts, self.store.engine, missing, int(now), window
        )
        read.addTimeout(min(self.db_timeout or SHARED_READ_BUDGET, SHARED_READ_BUDGET), self.clock)

        def got(counts: dict[str, int]) -> dict[str, int]:
            self.shared_counts.store(missing, counts, self.clock.seconds())
            return self.shared_counts.counts(keys, self.clock.seconds())

        def failed(failure: Failure) -> dict[str, int]:
            self._shared_unavailable_until = self.clock.seconds() + SHARED_RETRY
            log.warn("shared failure counters unavailable ({error}); local counters only",
                     error=failure.type.__name__ if failure.type else "error")
            return self.shared_counts.counts(keys, self.clock.seconds())

        return read.addCallbacks(got, failed)

    def _share_failure(self, keys: list[str], fingerprint: bytes, state: VerifierState) -> None:
        now = self.clock.seconds()
        self.shared_counts.bump(keys, now)
        self.shared_writes.record(keys, fingerprint.hex(), int(now), int(state.config.penalty_window))

    def _load(self, user: str) -> Loaded:
        """In the DB pool: the mailbox and its app passwords."""
        mailbox = self.store.get_mailbox(user)
        if mailbox is None:
            return None, []
        return mailbox, self.store.app_passwords_for(mailbox.id)

    @inlineCallbacks
    def _lookup(
        self, login: str, state: VerifierState
    ) -> Generator[Deferred[Any], Any, tuple[str, Loaded] | Verdict]:
        """The mailbox of ``login`` (through the record cache), or the Verdict that ends here."""
        try:
            address = parse_address(login)
        except AddressError:
            return Verdict(Outcome.UNKNOWN, reason="not an address")
        if address.routing:
            return Verdict(Outcome.UNKNOWN, reason="routing address")
        loaded = state.records.get(address.key, self.clock.seconds())
        if loaded is None:
            try:
                lookup: Deferred[Loaded] = self._db_run(self._load, str(address))
                if self.db_timeout:
                    lookup.addTimeout(self.db_timeout, self.clock)
                loaded = yield lookup
            except Exception as exc:
                log.error("database lookup failed: {error}", error=type(exc).__name__)
                return Verdict(Outcome.TEMPFAIL)
            assert loaded is not None
            state.records.put(address.key, loaded, self.clock.seconds())
        return address.key, loaded

    @inlineCallbacks
    def _decide(
        self, request: VerifyRequest, state: VerifierState
    ) -> Generator[Deferred[Any], Any, Verdict]:
        login = split_login(request, state.config.master_user_separator)
        for name in (login.target, login.master):
            why = None if name is None else bad_username(name, state.config.username_chars)
            if why:
                return Verdict(Outcome.UNKNOWN, reason=why)
        if not request.password:
            return Verdict(Outcome.FAIL, reason="empty password (never accepted)")
        if len(request.password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
            return Verdict(
                Outcome.FAIL, reason=f"password longer than {MAX_PASSWORD_BYTES} bytes (not checked)"
            )
        if login.master is not None:
            verdict: Verdict = yield self._decide_master(
                request, login.target, login.master, state
            )
            return verdict
        found: tuple[str, Loaded] | Verdict = yield self._lookup(login.target, state)
        if isinstance(found, Verdict):
            return found
        key, (mailbox, apps) = found
        if mailbox is None:
            return Verdict(Outcome.UNKNOWN, reason="unknown user")
        if not mailbox.allows(request.service):
            return Verdict(Outcome.FAIL, reason="service not allowed for this mailbox")
        checked: Verdict | None = yield self._check_password(request, key, mailbox, apps, state)
        if checked is not None:
            return checked
        return Verdict(Outcome.OK, mailbox.address)

    @inlineCallbacks
    def _check_password(
        self, request: VerifyRequest, key: str, mailbox: MailboxRecord,
        apps: list[AppPasswordRecord], state: VerifierState,
    ) -> Generator[Deferred[Any], Any, Verdict | None]:
        """None when ``request.password`` opens ``mailbox`` (enabled), else the Verdict."""
        now = self.clock.seconds()
        cache_key = state.cache.key(mailbox, request.password)
        entry = state.cache.get(cache_key, now)
        if entry is not None and self._still_valid(entry.app_password_id, apps, request.service):
            self.metrics.cache["hit"].inc()
            match: _Match | None = _Match(entry.app_password_id)
        else:
            self.metrics.cache["miss"].inc()
            try:
                match = yield self._cpu_run(self._hash_work, request, mailbox, apps,
                                           state.config.hash_niceness, state.passwords)
            except Exception as exc:
                log.error("password check failed: {error}", error=type(exc).__name__)
                return Verdict(Outcome.TEMPFAIL)
        if match is None:
            state.cache.discard(cache_key)
            return Verdict(Outcome.FAIL, reason="wrong password")
        if not mailbox.enabled:
            return Verdict(Outcome.DISABLED, reason="mailbox disabled")
        if entry is None:
            state.cache.put(cache_key, match.app_password_id, now)
        self._after_success(mailbox, match, key, apps, state)
        return None

    @inlineCallbacks
    def _decide_master(
        self, request: VerifyRequest, target: str, master: str, state: VerifierState
    ) -> Generator[Deferred[Any], Any, Verdict]:
        """``master`` logs in as ``target`` with its own (main) password."""
        if request.service == "smtp" and not state.config.master_user_smtp:
            return Verdict(Outcome.FAIL, reason=f"master user login as {printable(target)} "
                                                "refused on SMTP (master_user_smtp is off)")
        found: tuple[str, Loaded] | Verdict = yield self._lookup(master, state)
        if isinstance(found, Verdict):
            return found
        key, (master_box, _apps) = found
        if master_box is None:
            return Verdict(Outcome.UNKNOWN, reason="unknown master user")
        if not master_box.master:
            return Verdict(Outcome.FAIL, reason=f"{master_box.address} is not a master user "
                                                f"(tried to log in as {printable(target)})")
        # App passwords are a mailbox's own: only the master's main password opens other ones.
        checked: Verdict | None = yield self._check_password(request, key, master_box, [], state)
        if checked is not None:
            return checked
        target_found: tuple[str, Loaded] | Verdict = yield self._lookup(target, state)
        if isinstance(target_found, Verdict):
            return target_found
        _key, (mailbox, _target_apps) = target_found
        if mailbox is None:
            return Verdict(Outcome.UNKNOWN, reason=f"master user {master_box.address}: "
                                                   f"no mailbox {printable(target)}")
        if not mailbox.enabled:
            return Verdict(Outcome.DISABLED, reason=f"master user {master_box.address}: "
                                                    f"{mailbox.address} is disabled")
        if not mailbox.allows(request.service):
            return Verdict(Outcome.FAIL, reason=f"master user {master_box.address}: service not "
                                                f"allowed for {mailbox.address}")
        log.info(
            "master user {master} logged in as {user}: rip={rip} service={service}",
            master=master_box.address, user=mailbox.address,
            rip=printable(request.remote_ip or ""), service=printable(request.service),
        )
        self.metrics.master_logins.inc()
        return Verdict(Outcome.OK, mailbox.address)

    @staticmethod
    def _still_valid(app_id: int | None, apps: list[AppPasswordRecord], service: str) -> bool:
        if app_id is None:
            return True
        return any(app.id == app_id and app.allows(service) for app in apps)

    def _timed_check(self, password: str, stored: str) -> tuple[bool, str | None]:
        """Check one hash, observing its cost by scheme; unreadable hashes never match."""
        try:
            scheme = split_scheme(stored)[0]
        except HashError:
            return False, None
        started = time.perf_counter()
        try:
            ok = check_password(password, stored)
        except HashError as exc:
            log.warn("unusable stored hash ({error})", error=str(exc))
            ok = False
        self.metrics.verify_duration[scheme].observe(time.perf_counter() - started)
        return ok, scheme

    def _hash_work(
        self, request: VerifyRequest, mailbox: MailboxRecord, apps: list[AppPasswordRecord],
        niceness: int, passwords: PasswordConfig,
    ) -> _Match | None:
        """In the CPU pool: the main password first, then each app password for this service
        (the settings come as arguments: a reload never changes them under a running hash)."""
        _lower_thread_priority(niceness)
        try:
            scheme = split_scheme(mailbox.password)[0]
            started = time.perf_counter()
            verification = verify_password(request.password, mailbox.password, passwords)
            self.metrics.verify_duration[scheme].observe(time.perf_counter() - started)
            if verification.ok:
                return _Match(None, verification.new_hash, verification.scheme)
        except HashError as exc:
            log.warn("unusable stored hash for a mailbox ({error})", error=str(exc))
        for app in apps:
            if app.allows(request.service) and self._timed_check(request.password, app.password)[0]:
                return _Match(app.id)
        return None

    def _after_success(
        self, mailbox: MailboxRecord, match: _Match, key: str, apps: list[AppPasswordRecord],
        state: VerifierState,
    ) -> None:
        """Bookkeeping after the answer: last login, app password use, rehash; errors logged."""
        now = self.wallclock()
        store = self.store
        new_hash = match.new_hash
        last = mailbox.last_login_at
        record_login = last is None or now - last >= LAST_LOGIN_GRANULARITY
        if not (record_login or new_hash or match.app_password_id is not None):
            return
        if record_login:
            # The cached record must not ask for the same write again at the next login.
            state.records.replace(key, (dataclasses.replace(mailbox, last_login_at=now), apps))

        def work() -> bool:
            if record_login:
                store.record_login(mailbox.id, now)
            if match.app_password_id is not None:
                store.record_app_password_use(match.app_password_id, now)
            if new_hash:
                return store.replace_password_hash(mailbox.id, mailbox.password, new_hash)
            return False

        def done(replaced: bool) -> None:
            if replaced:
                self.metrics.rehashes[match.scheme].inc()

        def failed(failure: Failure) -> None:
            log.warn("recording the login failed: {error}", error=failure.getErrorMessage())

        self._db_run(work).addCallbacks(done, failed)
