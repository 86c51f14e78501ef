# -*- test-case-name: tests.unit.test_devrig -*-
"""Give the mail users inside a release root the host's uids and gids.

The rig bind-mounts the test's directories into the root at the same paths; files there are
created by both sides (the host chowns Postfix's data directory, Dovecot in the root writes
Maildirs that deliver on the host writes too), so ``postfix``, ``dovecot``, ``dovenull`` and the
groups ``postfix``, ``postdrop``, ``dovecot``, ``dovenull`` must have the same numbers on both.

Run by ``scripts/lib.sh`` with the system Python (standard library only) before any venv exists:
``python3 devrig/rootfs.py ids`` prints the host's ids (part of the root's recipe stamp);
``python3 devrig/rootfs.py align ROOT`` renumbers the root's entries and the files they own;
``python3 devrig/rootfs.py mirror CODENAME`` prints the Debian mirror the host's apt sources use
for that suite (when ``apt-get indextargets`` knows none: no package lists downloaded yet).
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

USERS = ("postfix", "dovecot", "dovenull")
GROUPS = ("postfix", "postdrop", "dovecot", "dovenull")
# The root's own mounts during a build; never walked.
SKIP = ("proc", "sys", "dev")


def read_ids(path: Path) -> dict[str, int]:
    """name -> id from a passwd or group file."""
    ids = {}
    for line in path.read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[2].isdigit():
            ids[fields[0]] = int(fields[2])
    return ids


def renumber(current: Mapping[str, int], wanted: Mapping[str, int]) -> dict[int, int]:
    """old id -> new id so that every name in ``wanted`` gets its wanted id.

    An entry of the root that holds a wanted id under another name moves to a free system id
    (100-999) first, so no two names ever share a number.
    """
    mapping: dict[int, int] = {}
    taken = set(current.values()) | set(wanted.values())
    for name, new in wanted.items():
        old = current.get(name)
        if old is None or old == new:
            continue
        mapping[old] = new
    targets = set(mapping.values())
    for name, old in current.items():
        if old in targets and name not in wanted and old not in mapping:
            free = next(i for i in range(999, 99, -1) if i not in taken)
            taken.add(free)
            mapping[old] = free
    return mapping


def rewrite(path: Path, column: int, mapping: Mapping[int, int]) -> None:
    """Renumber one id column of a passwd or group file (2: the entry's id; 3: passwd's group)."""
    lines = []
    for line in path.read_text().splitlines():
        fields = line.split(":")
        if len(fields) > column and fields[column].isdigit():
            own = int(fields[column])
            fields[column] = str(mapping.get(own, own))
        lines.append(":".join(fields))
    path.write_text("\n".join(lines) + "\n")


def chown_tree(root: Path, uids: Mapping[int, int], gids: Mapping[int, int]) -> None:
    """Give every file owned by a renumbered id its new owner (symlinks themselves included),
    keeping its mode."""
    for directory, subdirs, files in os.walk(root):
        if Path(directory) == root:
            subdirs[:] = [d for d in subdirs if d not in SKIP]
        for name in [*subdirs, *files]:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if info.st_uid in uids or info.st_gid in gids:
                os.lchown(path, uids.get(info.st_uid, info.st_uid), gids.get(info.st_gid, info.st_gid))
                if not stat.S_ISLNK(info.st_mode):
                    # chown clears set-gid (postdrop, postqueue): put the mode back.
                    os.chmod(path, stat.S_IMODE(info.st_mode))


def align(root: Path, host: Path = Path("/")) -> None:
    host_users = {name: uid for name, uid in read_ids(host / "etc/passwd").items() if name in USERS}
    host_groups = {name: gid for name, gid in read_ids(host / "etc/group").items() if name in GROUPS}
    passwd, group = root / "etc/passwd", root / "etc/group"
    uids = renumber(read_ids(passwd), host_users)
    gids = renumber(read_ids(group), host_groups)
    if not uids and not gids:
        return
    rewrite(passwd, 2, uids)
    rewrite(passwd, 3, gids)  # each user's primary group follows its group
    rewrite(group, 2, gids)
    chown_tree(root, uids, gids)


def apt_mirror(codename: str, etc: Path = Path("/etc/apt")) -> str | None:
    """The first ``deb`` URI serving ``codename`` in the one-line and deb822 sources files."""
    one_line = [etc / "sources.list", *sorted((etc / "sources.list.d").glob("*.list"))]
    for path in one_line:
        for line in path.read_text().splitlines() if path.is_file() else []:
            words = line.split("#", 1)[0].split()
            if words[:1] != ["deb"]:
                continue
            words = words[1:]
            if words and words[0].startswith("["):  # [options]
                while words and not words[0].endswith("]"):
                    words.pop(0)
                words = words[1:]
            if len(words) >= 2 and words[1] == codename:
                return words[0]
    for path in sorted((etc / "sources.list.d").glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
            if ("deb" in fields.get("types", []) and codename in fields.get("suites", [])
                    and fields.get("uris") and fields.get("enabled", ["yes"]) != ["no"]):
                return fields["uris"][0]
    return None


def main(argv: list[str]) -> int:
    if argv[:1] == ["ids"]:
        users, groups = read_ids(Path("/etc/passwd")), read_ids(Path("/etc/group"))
        print(*(f"user:{n}={users.get(n)}" for n in USERS), *(f"group:{n}={groups.get(n)}" for n in GROUPS))
        return 0
    if len(argv) == 2 and argv[0] == "align":
        align(Path(argv[1]))
        return 0
    if len(argv) == 2 and argv[0] == "mirror":
        mirror = apt_mirror(argv[1])
        if mirror:
            print(mirror)
        return 0 if mirror else 1
    print("usage: rootfs.py ids | align ROOT | mirror CODENAME", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
