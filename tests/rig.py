"""End-to-end test rig: private stock Postfix and Dovecot, and mailplugins daemons.

The instances come from :mod:`devrig.instances` (also used by the local demo stack); this
module adds the daemons run as ``mailplugins serve`` subprocesses with a ready database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from devrig.instances import (  # noqa: F401 - the rig's public API
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
from mailplugins.config import parse_config
from mailplugins.db import schema
from mailplugins.db.engine import make_engine
from mailplugins.store import Store

REPO = Path(__file__).resolve().parent.parent


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
