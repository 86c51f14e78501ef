# -*- test-case-name: tests.unit.test_greylist -*-
"""SPF, greylisting and rate limits joined into the request flow, with per-message memory.

The service calls :meth:`StatefulChecks.at_rcpt` when its own rules had no opinion on a RCPT
request, and :meth:`at_data` / :meth:`at_end_of_message` for those states. At RCPT, for
unauthenticated clients outside mynetworks: SPF first (once per message, i.e. per Postfix
``instance``; its verdict applies to every recipient), then greylisting. Rate limits decide at
DATA and END-OF-MESSAGE.

Postfix takes one action per reply, so headers wait in a small per-message queue:
``Received-SPF`` and the first-pass ``X-Greylist`` each go out once, as ``PREPEND`` on a reply
that would otherwise be DUNNO (the next recipient, or DATA when policyd is asked there).
Never at END-OF-MESSAGE, where Postfix does not allow PREPEND. The memory holds the last
``memory_size`` messages only.

Each check has a timeout within the policyd budget and a fallback; expired rows are purged
from the database pool on a timer, never on the reactor.

The checks a configuration asks for are one :class:`CheckSet`, built whole by
:meth:`StatefulChecks.configure` and swapped as one reference: a request decides with the set it
started with (the service hands it in), whatever SIGHUP does meanwhile. The per-message memory,
the SQLite transaction grouping and the SPF pool outlive reloads. :meth:`StatefulChecks.periodic`
says which timers the current set needs (the daemon's :class:`~mailplugins.timers.Timers` runs
them): the purge while greylisting or rate limits are on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from prometheus_client import Counter
from sqlalchemy import Engine
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailplugins.config import Config
from mailplugins.config.policy_state import GreylistConfig, RateLimitConfig, SPFConfig
from mailplugins.daemon import Runtime
from mailplugins.metrics import DaemonMetrics, LabelCache
from mailplugins.threads import RunInPool, WorkerPool
from mailplugins.timers import Periodic
from policyd.batch import batching_runner
from policyd.codec import PolicyRequest
from policyd.greylist import Greylister
from policyd.pooled import Clock
from policyd.ratelimit import RateLimiter
from policyd.spf import SPFChecker, SPFOutcome
from policyd.sql.greylist import GreylistTiming
from policyd.sql.purge import purge

log = Logger(namespace="policyd.message_checks")



@dataclass(slots=True)
class _Message:
    """What is remembered of one message. Tuples of strings rather than a set and a list:
    up to ``memory_size`` of these live until evicted, and the garbage collector walks every
    container object on each full pass, while it soon stops tracking tuples of strings."""

    spf: SPFOutcome | None = None
    headers_queued: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()


def _runs_in(contexts: tuple[str, ...] | None, request: PolicyRequest) -> bool:
    return contexts is None or request.get("policy_context") in contexts


@dataclass(frozen=True)
class CheckSet:
    """The checks of one configuration; a reload makes a new one, never changes this one."""

    ratelimit: RateLimiter | None = None
    greylist: Greylister | None = None
    spf: SPFChecker | None = None
    budget: float = 1.0
    delimiters: str = "+"

    @property
    def enabled(self) -> bool:
        return any((self.ratelimit, self.greylist, self.spf))

    def purge_settings(self) -> tuple[GreylistTiming, int, float] | None:
        """What a purge needs: greylist timing, longest rate window, interval; None if off."""
        if not (self.greylist or self.ratelimit):
            return None
        timing = self.greylist.timing if self.greylist else GreylistTiming()
        intervals = []
        longest = 0
        if self.greylist:
            intervals.append(self.greylist.config.purge_interval)
        if self.ratelimit:
            config = self.ratelimit.config
            intervals.append(config.purge_interval)
            longest = max([rule.longest for rule in config.rules] + [config.max_override_period])
        return timing, longest, min(intervals)


class StatefulChecks:
    def __init__(
        self,
        *,
        engine: Engine,
        db_run: RunInPool,
        spf_run: RunInPool | None,
        clock: Clock,
        budget: float,
        ratelimit: RateLimitConfig | None = None,
        greylist: GreylistConfig | None = None,
        spf: SPFConfig | None = None,
        delimiters: str = "+",
        memory_size: int = 10_000,
    ) -> None:
        self._engine = engine
        self._db_run = db_run
        #: Runs greylisting and rate-limit checks: grouped into shared transactions on SQLite
        #: (made with the first of those checks; kept across reloads).
        self._state_run: RunInPool | None = None
        self._spf_run = spf_run
        self._clock = clock
        self.memory_size = memory_size
        self._messages: OrderedDict[str, _Message] = OrderedDict()
        #: The current checks, replaced whole by :meth:`configure`.
        self.checks = CheckSet(budget=budget, delimiters=delimiters)
        #: The SPF thread pool, when the daemon made one (stopped with the checks).
        self.spf_pool: WorkerPool | None = None
        self.observers: dict[str, Callable[[str], None]] = {}
        self.configure(ratelimit, greylist, spf, budget, delimiters)

    @property
    def enabled(self) -> bool:
        return self.checks.enabled

    @property
    def ratelimit(self) -> RateLimiter | None:
        return self.checks.ratelimit

    @property
    def greylist(self) -> Greylister | None:
        return self.checks.greylist

    @property
    def spf(self) -> SPFChecker | None:
        return self.checks.spf

    def configure(
        self,
        ratelimit: RateLimitConfig | None,
        greylist: GreylistConfig | None,
        spf: SPFConfig | None,
        budget: float,
        delimiters: str,
    ) -> CheckSet:
        """Build the checks of a (re)loaded configuration and make them current in one step;
        the database state and the per-message memory are kept."""
        state_run = self._state_run
        if state_run is None and (ratelimit or greylist):
            state_run = self._state_run = batching_runner(self._engine, self._db_run)
        if spf is not None and self._spf_run is None:
            raise ValueError("SPF needs a worker pool")
        checks = CheckSet(
            ratelimit=(
                RateLimiter(ratelimit, self._engine, state_run, self._clock, delimiters=delimiters)
                if ratelimit and state_run else None
            ),
            greylist=(
                Greylister(greylist, self._engine, state_run, self._clock, delimiters=delimiters)
                if greylist and state_run else None
            ),
            spf=SPFChecker(spf, self._spf_run, self._clock) if spf and self._spf_run else None,
            budget=budget,
            delimiters=delimiters,
        )
        for name, observer in self.observers.items():
            _observe(checks, name, observer)
        self.checks = checks
        return checks

    def observe(self, check: str, observer: Callable[[str], None]) -> None:
        """Report each outcome of ``check`` ("ratelimit", "greylist", "spf") to ``observer``."""
        self.observers[check] = observer
        _observe(self.checks, check, observer)

    # -- per-message memory ----------------------------------------------------------------

    def _message(self, request: PolicyRequest) -> _Message:
        """The message's memory: the remembered one, else a new one that is kept (see
        :meth:`_keep`) only once it holds something. Most greylisted requests leave nothing to
        remember, and a memory per request would fill with objects that live until evicted,
        which made the garbage collector's full passes long (tens of ms with the reactor
        stopped, the fresh-triplet stream's p99)."""
        instance = request.get("instance")
        message = self._messages.get(instance) if instance else None
        if message is None:
            return _Message()
        self._messages.move_to_end(instance)
        return message

    def _keep(self, request: PolicyRequest, message: _Message) -> None:
        """Remember ``message`` under its Postfix ``instance`` (bounded: oldest dropped)."""
        instance = request.get("instance")
        if not instance or self._messages.get(instance) is message:
            return
        self._messages[instance] = message
        while len(self._messages) > self.memory_size:
            self._messages.popitem(last=False)

    @staticmethod
    def _queue(message: _Message, header: str | None) -> None:
        if header:
            name = header.split(":", 1)[0].lower()
            if name not in message.headers_queued:
                message.headers_queued += (name,)
                message.pending += (header,)

    @staticmethod
    def _next_header(message: _Message) -> str | None:
        if not message.pending:
            return None
        header, message.pending = message.pending[0], message.pending[1:]
        return f"PREPEND {header}"

    def _remaining(self, deadline: float) -> float:
        return max(0.05, deadline - self._clock.seconds())

    # -- decisions ---------------------------------------------------------------------------

    async def at_rcpt(
        self, request: PolicyRequest, trusted: bool, checks: CheckSet | None = None
    ) -> str | None:
        """SPF and greylisting for an unauthenticated client; None when neither objects.

        ``checks`` is the set the request started with (the current one if not given).
        """
        checks = checks or self.checks
        if trusted or not (checks.spf or checks.greylist):
            return None
        # Leave a margin of the budget for the reply itself.
        deadline = self._clock.seconds() + checks.budget * 0.9
        message = self._message(request)
        outcome: SPFOutcome | None = None
        spf = checks.spf
        if spf is not None and _runs_in(spf.config.contexts, request):
            outcome = message.spf
            if outcome is None:
                outcome = await spf.check(request, self._remaining(deadline) * 0.6)
                message.spf = outcome
                self._keep(request, message)
            if outcome.action is not None:
                return outcome.action
            self._queue(message, outcome.header)
        greylist = checks.greylist
        if greylist is not None and _runs_in(greylist.config.contexts, request):
            spf_passed = outcome is not None and outcome.result == "pass"
            if not (greylist.config.skip_on_spf_pass and spf_passed):
                action, header = await greylist.check(request, self._remaining(deadline))
                if action is not None:
                    return action
                self._queue(message, header)
        if message.headers_queued:
            self._keep(request, message)
        return self._next_header(message)

    async def at_data(self, request: PolicyRequest, checks: CheckSet | None = None) -> str | None:
        ratelimit = (checks or self.checks).ratelimit
        if ratelimit is not None and _runs_in(ratelimit.config.contexts, request):
            action = await ratelimit.at_data(request)
            if action is not None:
                return action
        instance = request.get("instance")
        message = self._messages.get(instance) if instance else None
        return self._next_header(message) if message is not None else None

    async def at_end_of_message(
        self, request: PolicyRequest, checks: CheckSet | None = None
    ) -> str | None:
        ratelimit = (checks or self.checks).ratelimit
        if ratelimit is not None and _runs_in(ratelimit.config.contexts, request):
            return await ratelimit.at_end_of_message(request)
        return None

    # -- expiry ------------------------------------------------------------------------------

    def purge_now(self, checks: CheckSet | None = None) -> Deferred[Any]:
        """Delete expired greylisting and rate-limit rows, in the database pool."""
        settings = (checks or self.checks).purge_settings()
        if settings is None:
            return Deferred.fromCoroutine(_nothing())
        timing, longest, _interval = settings
        work = self._db_run(purge, self._engine, self._clock.seconds(), timing, longest)

        def done(counts: Any) -> None:
            log.info("purged expired policy state: {counts}", counts=counts)

        def failed(failure: Any) -> None:
            log.warn("purging policy state failed: {error}", error=failure.getErrorMessage())

        work.addCallbacks(done, failed)
        return work

    def periodic(self) -> list[Periodic]:
        """The timers the current checks need: the purge while greylisting or rate limits are
        on (first run one interval after it starts), none otherwise."""
        checks = self.checks
        settings = checks.purge_settings()
        if settings is None:
            return []
        return [Periodic("purge", settings[2], partial(self.purge_now, checks))]

    def close(self) -> None:
        """Daemon shutdown: stop the SPF pool (the daemon stops the timers)."""
        if self.spf_pool is not None:
            self.spf_pool.stop()

    async def decide_late(self, request: PolicyRequest, checks: CheckSet | None = None) -> str:
        """DATA and END-OF-MESSAGE for the service: an action, DUNNO when none."""
        if request.get("protocol_state") == "END-OF-MESSAGE":
            action = await self.at_end_of_message(request, checks)
        else:
            action = await self.at_data(request, checks)
        return action if action is not None else "DUNNO"


async def _nothing() -> None:
    return None


def _observe(checks: CheckSet, check: str, observer: Callable[[str], None]) -> None:
    target = getattr(checks, check)
    if target is not None:
        target.observe = observer


def _metrics(checks: StatefulChecks, metrics: DaemonMetrics) -> None:
    """Outcome counters; labels are bounded (outcome or SPF result names only)."""
    for check, name, doc, label in (
        ("ratelimit", "ratelimit_decisions_total", "Rate-limit decisions.", "outcome"),
        ("greylist", "greylist_decisions_total", "Greylisting decisions.", "outcome"),
        ("spf", "spf_results_total", "SPF results.", "result"),
    ):
        children = LabelCache(metrics.counter(name, doc, [label]))

        def observe(outcome: str, children: LabelCache[Counter] = children) -> None:
            children[outcome].inc()

        checks.observe(check, observe)


def build_stateful(runtime: Runtime) -> StatefulChecks:
    """The checks for ``runtime``'s config, with their SPF pool and metrics (the daemon runs
    the timers :meth:`StatefulChecks.periodic` asks for)."""
    config = runtime.config
    section = config.policyd
    assert section is not None
    spf = section.spf
    threads = spf.threads if spf is not None else 8
    pool = WorkerPool(runtime.reactor, "spf", threads)
    checks = StatefulChecks(
        engine=runtime.db.engine,
        db_run=runtime.db.run,
        spf_run=pool.run,
        clock=runtime.reactor,
        budget=section.budget,
        ratelimit=section.ratelimit,
        greylist=section.greylist,
        spf=spf,
        delimiters=config.mail.recipient_delimiter,
    )
    checks.spf_pool = pool
    _metrics(checks, runtime.metrics)
    return checks


def reload_stateful(checks: StatefulChecks, config: Config) -> CheckSet:
    """SIGHUP: the new settings' checks; database state and the per-message memory are kept."""
    section = config.policyd
    assert section is not None
    return checks.configure(section.ratelimit, section.greylist, section.spf, section.budget,
                            config.mail.recipient_delimiter)
