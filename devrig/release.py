# -*- test-case-name: tests.unit.test_devrig -*-
"""The Debian releases the rig runs stock Postfix and Dovecot from: the host's own packages, or
a root of the other release that ``scripts/lib.sh`` (``ensure_release_root``) builds.

On a Debian 12 host, ``debian12`` is the host and ``debian13`` (Postfix 3.10, Dovecot 2.4) a
root under ``/var/cache/mailplugins-test``; on a Debian 13 host it is the other way round.

A command for a root runs as ``chroot ROOT COMMAND`` inside its own private mount namespace
(``unshare --mount``) where ``/tmp`` (every test's scratch directory, Maildirs and sockets), the
repository checkout and any extra directories are bind-mounted at the same paths, with ``/proc``
and ``/dev``. The mounts are never visible outside that namespace and disappear with its last
process: when a command exits, or, for a daemon such as Postfix's master, when the daemon
stops. So no test, failed or killed, can leave a mount behind, and concurrent test runs never
share one. The loopback network is the host's: TCP on 127.0.0.1 needs nothing.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Where scripts/lib.sh builds the roots (``MAILPLUGINS_RIG_CACHE`` moves it).
CACHE = Path(os.environ.get("MAILPLUGINS_RIG_CACHE", "/var/cache/mailplugins-test"))
#: The releases every Postfix/Dovecot e2e test runs against.
NAMES = ("debian12", "debian13")
#: The checkout the rig runs from: Lua scripts and other files the configs name live here.
REPO = Path(__file__).resolve().parent.parent

# Mount the given directories at the same paths inside the root, then /proc and /dev, then run
# the command there. "$1" is the root; the directories follow, up to "--"; then the command.
_ENTER = r"""
root=$1; shift
while [ "$1" != -- ]; do
    mkdir -p "$root$1" && mount --rbind "$1" "$root$1" || exit 125
    shift
done
shift
mount -t proc proc "$root/proc" && mount --rbind /dev "$root/dev" || exit 125
exec chroot "$root" "$@"
"""


def shown(cmd: Sequence[str]) -> str:
    """A command line for an error message, ``chroot ROOT ...`` for one :meth:`Release.command`
    made (not the mount script)."""
    if len(cmd) > 9 and cmd[7] == _ENTER:
        return " ".join(["chroot", cmd[9], *cmd[list(cmd).index("--", 10) + 1:]])
    return " ".join(cmd)


def host_debian(os_release: Path = Path("/etc/os-release")) -> str:
    """The host's release name (``debian12``, ``debian13``) from ``/etc/os-release``."""
    fields = dict(
        line.split("=", 1) for line in os_release.read_text().splitlines() if "=" in line
    )
    return "debian" + fields.get("VERSION_ID", "").strip('"')


def bind_paths(paths: Iterable[str | Path]) -> list[str]:
    """Absolute, de-duplicated directories to bind, none inside another (its parent brings it),
    shortest first."""
    chosen: list[str] = []
    for path in sorted({os.path.normpath(os.path.abspath(p)) for p in paths}, key=len):
        if not any(path == c or path.startswith(c.rstrip("/") + "/") for c in chosen):
            chosen.append(path)
    return chosen


@dataclass(frozen=True)
class Release:
    """Where one release's Postfix and Dovecot run: the host (``root`` None) or a root."""

    name: str
    root: Path | None = None

    @property
    def short(self) -> str:
        """The test id: ``deb12``, ``deb13``."""
        return self.name.replace("debian", "deb")

    def path(self, path: str | Path) -> Path:
        """Where the host sees a file of this release (``/etc/postfix/master.cf`` ...)."""
        return Path(path) if self.root is None else self.root / str(path).lstrip("/")

    def command(self, argv: Sequence[str], binds: Iterable[str | Path] = ()) -> list[str]:
        """``argv`` as it runs for this release; ``binds``: directories outside /tmp and the
        checkout that the command must see."""
        if self.root is None:
            return list(argv)
        paths = bind_paths([tempfile.gettempdir(), REPO, *binds])
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _ENTER,
                "sh", str(self.root), *paths, "--", *argv]

    def check(self) -> None:
        """Fail with one line saying how to build the root when it is missing."""
        if self.root is not None and not (self.root / "usr/sbin/postfix").exists():
            raise RuntimeError(
                f"no {self.name} root at {self.root}: build it with scripts/test "
                f"(or: . scripts/lib.sh && ensure_release_root)"
            )

    @functools.cached_property
    def dovecot_version(self) -> tuple[int, int]:
        """(major, minor) of this release's Dovecot: (2, 3) or (2, 4)."""
        return _version(self.command(["dovecot", "--version"]))

    @functools.cached_property
    def postfix_version(self) -> tuple[int, int]:
        """(major, minor) of this release's Postfix: (3, 7) or (3, 10)."""
        return _version(self.command(["postconf", "-d", "-h", "mail_version"]))

    @property
    def dovecot24(self) -> bool:
        return self.dovecot_version >= (2, 4)


def _version(command: list[str]) -> tuple[int, int]:
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    match = re.match(r"(\d+)\.(\d+)", out.strip())
    if match is None:
        raise RuntimeError(f"no version in the output of {' '.join(command)}: {out!r}")
    return int(match.group(1)), int(match.group(2))


@functools.cache
def release(name: str) -> Release:
    """The release called ``name``: the host's, or a root built under CACHE."""
    if name not in NAMES:
        raise ValueError(f"unknown release {name!r} (known: {', '.join(NAMES)})")
    if name == host_debian():
        return Release(name)
    return Release(name, CACHE / name)


def host() -> Release:
    """The host's own release (what the rig uses when a test names none)."""
    name = host_debian()
    return release(name) if name in NAMES else Release(name)
