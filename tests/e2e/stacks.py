"""Local stacks (daemons + stock Postfix and Dovecot) for the end-to-end modules that need them."""

from __future__ import annotations

import shutil
import signal
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mailplugins.instances import ServeProcess, short_tempdir
from mailplugins.localstack import LocalStack, Ports


def insecure_tls() -> ssl.SSLContext:
    """A client context for the stacks' self-signed certificates."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@contextmanager
def running_stacks(count: int = 1, **options: Any) -> Iterator[list[LocalStack]]:
    """``count`` stacks on free ports, each in its own scratch directory; ``options`` go to
    LocalStack (e.g. a shared ``database_url``). All are stopped and removed afterwards."""
    roots = [short_tempdir() for _ in range(count)]
    stacks = [LocalStack(root, Ports.free(), **options) for root in roots]
    try:
        for stack in stacks:
            stack.start()
        yield stacks
    finally:
        for stack in stacks:
            stack.stop()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


class DaemonsApart(ServeProcess):
    """policyd, authd and deliver as three ``mailplugins serve`` processes on one config (as
    the systemd units run them), so a test can kill and restart one daemon alone.

    Stands in for LocalStack's single ``mailplugins serve`` (same start/stop/output); each
    daemon logs to ``<name>.log`` in ``log_dir``.
    """

    NAMES = ("policyd", "authd", "deliver")

    def __init__(self, config_path: Path, log_dir: Path) -> None:
        super().__init__(config_path, log_path=log_dir / "daemons.log")
        self.each = {name: ServeProcess(config_path, [name], log_dir / f"{name}.log")
                     for name in self.NAMES}

    def start(self, timeout: float = 30.0) -> DaemonsApart:
        for serve in self.each.values():
            serve.start(timeout)
        return self

    def output(self) -> str:
        return "".join(f"--- {name}\n{serve.output()}" for name, serve in self.each.items())

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for serve in self.each.values():
            serve.kill(sig)

    def stop(self) -> int | None:
        statuses = [serve.stop() for serve in reversed(self.each.values())]
        return next((status for status in statuses if status), statuses[-1])


@contextmanager
def running_stack_apart(
    postfix_main: Mapping[str, str] | None = None, **options: Any
) -> Iterator[LocalStack]:
    """One LocalStack (free ports, own scratch directory) whose daemons run as three
    processes (see DaemonsApart), with extra main.cf settings ``postfix_main`` (those the
    generators do not set survive LocalStack.start); stopped and removed afterwards."""
    root = short_tempdir()
    stack = LocalStack(root, Ports.free(), **options)
    stack.daemons = DaemonsApart(stack.config_path, stack.root)
    stack.postfix.main.update(postfix_main or {})
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
