"""End-to-end test rig: private stock Postfix and Dovecot, and mailplugins daemons.

The instances come from :mod:`devrig.instances` (also used by the local demo stack); this
module adds the daemons run as ``mailplugins serve`` subprocesses with a ready database, and
:class:`RigFactory`, which every e2e module builds its instances with: one scratch directory,
one release (the ``release`` fixture), everything stopped and removed afterwards.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import yaml

from devrig.instances import (
    Dovecot,
    Postfix,
    ServeProcess,
    free_port,
    port_open,
    run,
    short_tempdir,
    unix_socket_open,
    wait_until,
)
from devrig.leftovers import mark_owner
from devrig.release import Release
from mailplugins.config import parse_config
from mailplugins.db import schema
from mailplugins.db.engine import make_engine
from mailplugins.store import Store

REPO = Path(__file__).resolve().parent.parent

#: The rig's public API, the re-exported devrig helpers included.
__all__ = [
    "REPO",
    "Daemons",
    "Dovecot",
    "Postfix",
    "RigFactory",
    "ServeProcess",
    "Stoppable",
    "free_port",
    "port_open",
    "run",
    "short_tempdir",
    "unix_socket_open",
    "wait_until",
    "write_config",
]


def write_config(path: str | Path, data: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))
    return path


class Daemons(ServeProcess):
    """``mailplugins serve`` as a subprocess, with its own config and a ready database.

    The config defaults to a SQLite file in ``root``; ``store`` is a Store on the same database
    (schema created) for setting up users.
    """

    def __init__(
        self, root: str | Path, config: Mapping[str, Any], daemons: Sequence[str] = ()
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        data = dict(config)
        data.setdefault("database", {"url": f"sqlite:///{self.root}/mail.db"})
        # Fast hashes keep tests quick; the hashing tests cover the strong defaults.
        data.setdefault("passwords", {"scheme": "SHA512-CRYPT", "sha_crypt_rounds": 5000})
        self.config_data = data
        config_path = write_config(self.root / "mailplugins.yaml", data)
        super().__init__(config_path, daemons, self.root / "daemons.log", cwd=REPO)
        self.config = parse_config(data, str(config_path))
        self.engine = make_engine(self.config.database)
        schema.upgrade(self.engine)
        self.store = Store(self.engine)

    def start(self, timeout: float = 30.0) -> Daemons:
        super().start(timeout)
        return self

    def stop(self) -> int | None:
        status = super().stop()
        self.engine.dispose()
        return status


class Stoppable(Protocol):
    def stop(self) -> object: ...


S = TypeVar("S", bound=Stoppable)


class RigFactory:
    """Builds one test's (or module's) instances on one release in one scratch directory.

    ``postfix()``, ``dovecot()`` and ``daemons()`` make instances (not started: a test may
    adjust them first); ``start()`` starts one and remembers it. ``close()`` (or leaving the
    ``with`` block, a failed test included) stops every started thing in reverse order, even
    when one of the stops fails, then removes the directory.
    """

    def __init__(self, release: Release, prefix: str = "mp-") -> None:
        self.release = release
        self.root = short_tempdir(prefix)
        mark_owner(self.root)  # a later session stops what this one leaves if it is killed
        self.started: list[Stoppable] = []

    def postfix(self, **options: Any) -> Postfix:
        return Postfix(self.root, release=self.release, **options)

    def dovecot(self, **options: Any) -> Dovecot:
        return Dovecot(self.root, release=self.release, **options)

    def daemons(
        self, config: Mapping[str, Any], daemons: Sequence[str] = (), subdir: str = "mp"
    ) -> Daemons:
        return Daemons(self.root / subdir, config, daemons)

    def start(self, thing: S, *args: Any) -> S:
        """Start ``thing`` (``thing.start(*args)``) and stop it on close."""
        thing.start(*args)  # type: ignore[attr-defined]
        self.started.append(thing)
        return thing

    def stop_later(self, things: Iterable[Stoppable]) -> None:
        """Stop ``things`` on close too (started some other way)."""
        self.started.extend(things)

    def close(self) -> None:
        errors: list[BaseException] = []
        while self.started:
            try:
                self.started.pop().stop()
            except Exception as exc:  # stop the rest, then report the first failure
                errors.append(exc)
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> RigFactory:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
