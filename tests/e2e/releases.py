"""Where ``doveadm`` and an auth-only ``dovecot`` of each release run, until the rig's
``release`` fixture covers auth-client tests: the host's Dovecot 2.3 and the Debian 13 root's
Dovecot 2.4 (``chroot`` in a private mount namespace with /tmp bind-mounted at the same path, so
sockets under /tmp are reachable; the mounts vanish with the last process using them)."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("MAILPLUGINS_RIG_CACHE", "/var/cache/mailplugins-test"))

_ENTER = r"""
root=$1; shift
mount --rbind /tmp "$root/tmp" && mount -t proc proc "$root/proc" || exit 125
exec chroot "$root" "$@"
"""


@dataclass(frozen=True)
class DoveadmRelease:
    name: str
    expected_dovecot: tuple[int, int]
    root: Path | None = None

    def command(self, argv: Sequence[str]) -> list[str]:
        if self.root is None:
            return list(argv)
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _ENTER,
                "sh", str(self.root), *argv]

    def run(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(argv), capture_output=True, text=True, timeout=60,
                              check=False)

    def check(self) -> None:
        if self.root is not None and not (self.root / "usr/bin/doveadm").exists():
            raise RuntimeError(f"no {self.name} root with doveadm at {self.root}: build it with "
                               "scripts/test (ensure_release_root)")

    def dovecot_version(self) -> tuple[int, int]:
        out = self.run(["dovecot", "--version"]).stdout
        match = re.match(r"(\d+)\.(\d+)", out)
        assert match, out
        return int(match.group(1)), int(match.group(2))


RELEASES = (
    DoveadmRelease("deb12", (2, 3)),
    DoveadmRelease("deb13", (2, 4), CACHE / "debian13"),
)


class AuthOnlyDovecot:
    """A stock Dovecot of ``release`` with only its auth process of interest: ``passdbs`` are
    passwd-files (``(path, master)``), a static userdb, and the auth-client socket at
    ``socket``. Configuration in the syntax of the release (2.3 or 2.4)."""

    def __init__(self, release: DoveadmRelease, root: Path, passdbs: Sequence[tuple[Path, bool]],
                 extra: str = "") -> None:
        self.release = release
        self.root = root / "dovecot"
        self.config_path = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.base_dir = self.root / "run"
        self.socket = self.base_dir / "auth-client"
        self.passdbs = list(passdbs)
        self.extra = extra

    def _config(self) -> str:
        common = (f"instance_name = mp-{self.root.parent.name}\nbase_dir = {self.base_dir}\n"
                  f"state_dir = {self.root}/state\nlog_path = {self.log_path}\nprotocols =\n"
                  "auth_mechanisms = plain login\nauth_failure_delay = 0\n" + self.extra)
        if self.release.expected_dovecot >= (2, 4):
            passdbs = "".join(
                f"passdb p{i} {{\n  driver = passwd-file\n  passwd_file_path = {path}\n"
                f"  master = {'yes' if master else 'no'}\n}}\n"
                for i, (path, master) in enumerate(self.passdbs)
            )
            return ("dovecot_config_version = 2.4.1\ndovecot_storage_version = 2.4.1\n" + common
                    + "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n}\n"
                    + passdbs + "userdb static {\n  driver = static\n  fields {\n"
                    f"    uid = nobody\n    gid = nogroup\n    home = {self.root}/h\n  }}\n}}\n")
        passdbs = "".join(
            f"passdb {{\n  driver = passwd-file\n  args = {path}\n"
            f"  master = {'yes' if master else 'no'}\n}}\n"
            for path, master in self.passdbs
        )
        return (common + "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n"
                "  }\n}\n" + passdbs
                + f"userdb {{\n  driver = static\n  args = uid=nobody gid=nogroup home={self.root}/h\n}}\n")

    def start(self) -> AuthOnlyDovecot:
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self._config())
        # Dovecot daemonises with our stdout/stderr: give it a file, never a pipe we would wait on.
        errors = self.root / "dovecot.stderr"
        with open(errors, "ab") as out:
            result = subprocess.run(self.release.command(["dovecot", "-c", str(self.config_path)]),
                                    stdout=out, stderr=out, timeout=60, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"dovecot exited {result.returncode}: {errors.read_text()}"
                               f"{self.log_text()}")
        return self

    def stop(self) -> None:
        self.release.run(["doveadm", "-c", str(self.config_path), "stop"])
        pid_file = self.base_dir / "master.pid"
        deadline = time.monotonic() + 15
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
