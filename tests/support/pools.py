"""A database pool fake for the batching tests: work runs only when the test says so."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred


class HeldPool:
    """Stands in for ``Database.run``: calls queue up until :meth:`finish_one` runs the
    oldest in this thread, so a test decides when a batch is in flight and when it ends."""

    def __init__(self) -> None:
        self.waiting: list[
            tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Deferred[Any]]] = []

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        result: Deferred[Any] = Deferred()
        self.waiting.append((fn, args, kwargs, result))
        return result

    def finish_one(self) -> None:
        fn, args, kwargs, result = self.waiting.pop(0)
        maybeDeferred(fn, *args, **kwargs).chainDeferred(result)
