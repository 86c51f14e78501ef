"""End-to-end test rig: private stock Postfix and Dovecot, and mailplugins daemons.

The instances come from :mod:`mailplugins.instances` (also used by the local demo stack); this
module adds the daemons run as ``mailplugins serve`` subprocesses with a ready database.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mailplugins.config import parse_config
from mailplugins.db import schema
from mailplugins.db.engine import make_engine
from mailplugins.instances import (  # noqa: F401 - the rig's public API
    Dovecot,
    Postfix,
    free_port,
    port_open,
    run,
    short_tempdir,
    unix_socket_open,
    wait_until,
)
from mailplugins.store import Store

REPO = Path(__file__).resolve().parent.parent


def write_config(path: str | Path, data: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))
    return path


class Daemons:
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
        self.config_path = write_config(self.root / "mailplugins.yaml", data)
        self.config = parse_config(data, str(self.config_path))
        self.engine = make_engine(self.config.database)
        schema.upgrade(self.engine)
        self.store = Store(self.engine)
        self.daemons = list(daemons)
        self.log_path = self.root / "daemons.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "mailplugins.cli", "--config", str(self.config_path), *args]

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*args), capture_output=True, text=True, input=input,
                              cwd=REPO)

    def start(self, timeout: float = 30.0) -> Daemons:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.process = subprocess.Popen(
            self.command("serve", *self.daemons), stdout=log, stderr=subprocess.STDOUT, cwd=REPO
        )
        log.close()

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"mailplugins serve exited {self.process.returncode}:\n{self.output()}")
            return " ready" in self.output()

        wait_until(ready, timeout=timeout, what="mailplugins serve to be ready")
        return self

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def reload(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=15)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.engine.dispose()
        return self.process.returncode
