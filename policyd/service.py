# -*- test-case-name: tests.unit.test_policyd_service -*-
"""Runs the rule chain for one request within a time budget; failures become the fallback.

Postfix waits for exactly one answer per request, so :meth:`PolicyService.handle` always gives
an action (at once, or through a Deferred that never fails): the first rule that has an
opinion, ``DUNNO`` when none does (and for every protocol state other than RCPT), or the
configured fallback action when a lookup fails or the budget runs out. Timing is read from
injected callables; nothing here knows about sockets.

A request decides with one :class:`Snapshot` (settings, lookups and their cache, the stateful
checks), read once when it arrives; a reload builds the next snapshot whole and swaps it in, so
a request in flight never mixes old and new settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, cast

from sqlalchemy.exc import SQLAlchemyError
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailplugins.config.policyd import PolicydConfig
from mailplugins.metrics import DaemonMetrics, LabelCache
from mailplugins.records import StoreError
from policyd.actions import DUNNO, state_label, verb
from policyd.codec import PolicyRequest
from policyd.lookups import LookupOverloadError, Lookups
from policyd.message_checks import CheckSet, StatefulChecks
from policyd.pooled import Clock, Deadlines
from policyd.rules import RULES, Facts

log = Logger(namespace="policyd.service")


class PolicyMetrics:
    """The service's own metrics; label children are cached (this is the hot path)."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self.requests = LabelCache(metrics.counter(
            "requests_total", "Policy requests answered.", ["protocol_state", "action"]
        ))
        self.duration = metrics.histogram(
            "request_duration_seconds", "Time from a complete request to its answer."
        )
        self.fallbacks = LabelCache(metrics.counter(
            "fallback_total", "Requests answered with the fallback action.", ["reason"]
        ))

    def answered(self, state: str, action: str, seconds: float) -> None:
        self.requests[state_label(state), verb(action)].inc()
        self.duration.observe(seconds)

    def fallback(self, reason: str) -> None:
        self.fallbacks[reason].inc()


@dataclass(frozen=True)
class Snapshot:
    """What one request decides with, replaced whole by a reload."""

    config: PolicydConfig
    lookups: Lookups
    #: The stateful checks' set for ``config`` (None: no stateful checks attached).
    checks: CheckSet | None = None


class PolicyService:
    def __init__(
        self,
        config: PolicydConfig,
        lookups: Lookups,
        clock: IReactorTime,
        metrics: PolicyMetrics | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.snapshot = Snapshot(config, lookups)
        self._clock = clock
        #: The budget of each request that waits (one timer for all of them).
        self._deadlines = Deadlines(cast(Clock, clock))
        self._metrics = metrics
        self._timer = timer
        self._seen_states: set[str] = set()
        #: SPF, greylisting (RCPT) and rate limits (DATA, END-OF-MESSAGE); see policyd.message_checks.
        self._stateful: StatefulChecks | None = None
        self._seen_contexts: set[str] = set()

    @property
    def config(self) -> PolicydConfig:
        return self.snapshot.config

    @property
    def lookups(self) -> Lookups:
        return self.snapshot.lookups

    @property
    def stateful(self) -> StatefulChecks | None:
        return self._stateful

    @stateful.setter
    def stateful(self, checks: StatefulChecks | None) -> None:
        self._stateful = checks
        self.snapshot = replace(self.snapshot, checks=checks.checks if checks is not None else None)

    def swap(self, snapshot: Snapshot) -> None:
        """Make ``snapshot`` the one new requests use (requests in flight keep theirs)."""
        self.snapshot = snapshot
        self._seen_contexts.clear()

    def handle(self, request: PolicyRequest) -> str | Deferred[str]:
        """The action for ``request``: at once when every fact is cached (the hot path runs
        without a single Deferred), else a Deferred that fires within the budget. Never fails.
        """
        started = self._timer()
        state = request.get("protocol_state")
        snapshot = self.snapshot
        config = snapshot.config
        stateful = self._stateful
        checks = snapshot.checks
        if state == "RCPT":
            decision = self._decide(request, snapshot)
        elif (stateful is not None and checks is not None and checks.enabled
              and state in ("DATA", "END-OF-MESSAGE")):
            decision = stateful.decide_late(request, checks)
        else:
            # Nothing to check outside RCPT; DUNNO lets Postfix's own restrictions decide.
            self._note_state(state)
            return self._count(DUNNO, state, started)
        try:
            awaited = decision.send(None)
        except StopIteration as done:
            return self._count(done.value, state, started)
        except Exception:
            return self._count(self._fallback(Failure(), request, config), state, started)
        result = _finish(decision, awaited)
        self._deadlines.add(result, config.budget)
        result.addErrback(self._fallback, request, config)
        result.addCallback(self._count, state, started)
        return result

    def decide(self, request: PolicyRequest) -> Deferred[str]:
        """:meth:`handle`, always as a Deferred."""
        result = self.handle(request)
        return result if isinstance(result, Deferred) else succeed(result)

    def _count(self, action: str, state: str, started: float) -> str:
        if self._metrics is not None:
            self._metrics.answered(state, action, self._timer() - started)
        return action

    def _note_state(self, state: str) -> None:
        """Say once per state that it is not checked: a sender list run at MAIL (with
        ``smtpd_delay_reject = no``) would otherwise skip the sender checks silently."""
        label = state_label(state)
        if label not in self._seen_states:
            self._seen_states.add(label)
            log.info(
                "requests at protocol_state {state} are answered DUNNO: policyd decides at RCPT "
                "(keep smtpd_delay_reject = yes for checks in the client, helo and sender lists)",
                state=label,
            )

    def _note_context(self, context: str) -> None:
        """Say once that a context has no rule set of its own (a typo in master.cf or here)."""
        if len(self._seen_contexts) < 64 and context not in self._seen_contexts:
            self._seen_contexts.add(context)
            log.info("policy_context {context!r} has no rule set in policyd.contexts: "
                     "running the global checks", context=context)

    async def _decide(self, request: PolicyRequest, snapshot: Snapshot) -> str:
        config = snapshot.config
        facts = Facts(request, snapshot.lookups, config.mynetworks)
        if facts.context and facts.context not in config.contexts:
            self._note_context(facts.context)
        for name in config.checks_for(facts.context):
            action = await RULES[name](facts, config)
            if action is not None:
                # Postfix logs every rejection itself (NOQUEUE: reject: RCPT ...).
                log.debug(
                    "{check}: {action} (client {client}, context {context})",
                    check=name, action=action, client=facts.client_address,
                    context=facts.context or "-",
                )
                return action
        if self._stateful is not None and snapshot.checks is not None:
            late = await self._stateful.at_rcpt(request, facts.trusted, snapshot.checks)
            if late is not None:
                return late
        return DUNNO

    def _fallback(self, failure: Failure, request: PolicyRequest, config: PolicydConfig) -> str:
        if isinstance(failure.value, TimeoutError | CancelledError):
            reason = "timeout"
            log.warn(
                "no decision within {budget}s (client {client}); answering {action}",
                budget=config.budget, client=request.get("client_address"),
                action=config.fallback_action,
            )
        elif isinstance(failure.value, LookupOverloadError):
            reason = "overload"
            log.warn("database work queue full (client {client}); answering {action}",
                     client=request.get("client_address"), action=config.fallback_action)
        else:
            database = isinstance(failure.value, SQLAlchemyError | StoreError)
            reason = "database" if database else "error"
            log.failure(
                "check failed (client {client}); answering {action}", failure,
                client=request.get("client_address"), action=config.fallback_action,
            )
        if self._metrics is not None:
            self._metrics.fallback(reason)
        return config.fallback_action


def _finish(decision: Coroutine[Any, Any, str], awaited: Deferred[Any]) -> Deferred[str]:
    """Drive a coroutine that is waiting on ``awaited`` to its end, as a Deferred.

    Like ``Deferred.fromCoroutine`` but for a coroutine already started: :meth:`handle` runs it
    directly first, so that decisions on cached facts need no Deferred at all. Awaiting a
    Deferred yields it until it has fired and then reads its result, so the coroutine is
    resumed from inside the callback, while the result is still in place (a failure is thrown
    in, as Twisted does); the callback then returns None: the coroutine has taken it over.
    Cancelling the result (the budget ran out) cancels whatever the coroutine waits on.
    """
    waiting = [awaited]

    def cancel(_: Deferred[str]) -> None:
        waiting[0].cancel()

    result: Deferred[str] = Deferred(cancel)

    # resume is handed itself rather than naming itself: a closure that refers to itself is a
    # reference cycle, which kept every deferred request's coroutine and Deferreds alive
    # until the garbage collector's next full pass (and made those passes long).
    def resume(outcome: object, again: Callable[[object, Any], None]) -> None:
        try:
            error = outcome.value if isinstance(outcome, Failure) else None
            following = decision.send(None) if error is None else decision.throw(error)
        except StopIteration as done:
            if not result.called:
                result.callback(done.value)
        except BaseException:
            if not result.called:
                result.errback(Failure())
        else:
            waiting[0] = following
            following.addBoth(again, again)

    awaited.addBoth(resume, resume)
    return result
