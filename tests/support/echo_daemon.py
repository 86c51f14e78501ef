"""A minimal daemon plugin for testing the runner on its own: echoes lines back.

``python -m tests.support.echo_daemon ARGS`` runs the real ``mailplugins`` CLI with this plugin
standing in for ``deliver`` (it reads ``deliver.listen``), so start-up, reload, readiness and
shutdown are tested without depending on any real daemon.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from mailplugins import daemon as daemon_module
from mailplugins import runner
from mailplugins.config import Config
from mailplugins.daemon import Listener, Runtime, listeners_for


class Echo(LineOnlyReceiver):
    delimiter = b"\n"

    def lineReceived(self, line: bytes) -> None:
        if line == b"pid":  # which worker answered (mailplugins.workers)
            self.sendLine(f"{os.getpid()} {self.factory.tag}".encode())
            return
        self.sendLine(b"echo " + line + b" " + self.factory.tag.encode())


class EchoDaemon:
    def __init__(self, runtime: Runtime) -> None:
        self.factory = Factory.forProtocol(Echo)
        self.factory.tag = "v1"  # type: ignore[attr-defined]
        assert runtime.config.deliver is not None
        self.listeners: list[Listener] = listeners_for(
            "deliver.listen", runtime.config.deliver.listen, self.factory
        )

    def reload(self, config: Config) -> None:
        self.factory.tag = "v2"  # type: ignore[attr-defined]

    def stop(self) -> None:
        return None


class EchoPlugin:
    name = "deliver"

    def build(self, runtime: Runtime) -> EchoDaemon:
        return EchoDaemon(runtime)


def _load(name: str) -> Any:
    return EchoPlugin()


if __name__ == "__main__":
    vars(runner)["load_daemon"] = _load
    vars(runner)["daemon_names"] = lambda: ["deliver"]
    daemon_module.load_daemon = _load
    from mailplugins.cli import main

    sys.exit(main(sys.argv[1:]))
