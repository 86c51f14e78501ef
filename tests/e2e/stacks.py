"""Local stacks (daemons + stock Postfix and Dovecot) for the end-to-end modules that need them."""

from __future__ import annotations

import shutil
import ssl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from devrig.instances import short_tempdir
from devrig.leftovers import mark_owner
from devrig.localstack import DaemonsApart, LocalStack, Ports
from devrig.release import Release


def insecure_tls() -> ssl.SSLContext:
    """A client context for the stacks' self-signed certificates."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


@contextmanager
def running_stacks(
    release: Release, count: int = 1, **options: Any
) -> Iterator[list[LocalStack]]:
    """``count`` stacks on ``release`` on free ports, each in its own scratch directory;
    ``options`` go to LocalStack (e.g. a shared ``database_url``). All are stopped and removed
    afterwards, even when one fails to start."""
    roots = [short_tempdir() for _ in range(count)]
    for root in roots:
        mark_owner(root)
    stacks = [LocalStack(root, Ports.free(), release=release, **options) for root in roots]
    try:
        for stack in stacks:
            stack.start()
        yield stacks
    finally:
        for stack in stacks:
            stack.stop()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


@contextmanager
def running_stack_apart(
    release: Release, postfix_main: Mapping[str, str] | None = None, **options: Any
) -> Iterator[LocalStack]:
    """One LocalStack (free ports, own scratch directory) whose daemons run as three
    processes (see DaemonsApart), with extra main.cf settings ``postfix_main`` (those the
    generators do not set survive LocalStack.start); stopped and removed afterwards."""
    root = short_tempdir()
    mark_owner(root)
    stack = LocalStack(root, Ports.free(), release=release, **options)
    stack.daemons = DaemonsApart(stack.config_path, stack.root)
    stack.postfix.main.update(postfix_main or {})
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
