"""Where ``doveadm`` of each Dovecot release runs, until the rig's ``release`` fixture covers
auth-client tests: the host's Dovecot 2.3 and the Debian 13 root's Dovecot 2.4 (``chroot`` in a
private mount namespace with /tmp bind-mounted at the same path, so sockets under /tmp are
reachable; the mounts vanish with the command)."""

from __future__ import annotations

import os
import re
import subprocess
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
