# -*- test-case-name: tests.unit.test_devrig -*-
"""The dev rig's own helpers (``devrig/``), the parts that need no Postfix or Dovecot."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from devrig.instances import Dovecot, dovecot_mail_location, dovecot_static_auth, short_tempdir
from devrig.leftovers import mark_owner, stop_dead_runs
from devrig.localstack import LocalStack
from devrig.release import Release, bind_paths, host_debian, shown
from devrig.rootfs import align, apt_mirror, renumber


def test_short_tempdir_is_short_and_traversable_by_the_mail_users() -> None:
    path = short_tempdir()
    try:
        # Room for a socket name under it (sun_path is 108 bytes with its NUL).
        assert len(str(path)) < 40
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
    finally:
        path.rmdir()


def fake_release(dovecot: tuple[int, int]) -> Release:
    release = Release("debian99", Path("/nonexistent"))
    release.__dict__["dovecot_version"] = dovecot  # what the cached_property would find
    return release


def test_renumber_moves_the_mail_users_and_whoever_held_their_numbers() -> None:
    current = {"root": 0, "postfix": 101, "dovecot": 102, "opendkim": 108}
    mapping = renumber(current, {"postfix": 108, "dovecot": 102})
    assert mapping[101] == 108
    assert mapping[108] not in {0, 101, 102, 108}  # opendkim moved out of the way
    assert 102 not in mapping and 0 not in mapping


def test_align_rewrites_passwd_group_and_file_owners(tmp_path: Path) -> None:
    host, root = tmp_path / "host", tmp_path / "root"
    for base in (host, root):
        (base / "etc").mkdir(parents=True)
    (host / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\npostfix:x:108:111::/:/bin/false\n")
    (host / "etc/group").write_text("root:x:0:\npostfix:x:111:\npostdrop:x:112:\n")
    (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\npostfix:x:101:103::/:/bin/false\n")
    (root / "etc/group").write_text("root:x:0:\npostfix:x:103:\npostdrop:x:104:\n")
    spool = root / "var/spool/postfix"
    spool.mkdir(parents=True)
    os.chown(spool, 101, 103)
    tool = root / "postdrop"
    tool.write_text("")
    os.chown(tool, 0, 104)
    tool.chmod(0o2555)

    align(root, host)

    assert "postfix:x:108:111::" in (root / "etc/passwd").read_text()
    assert (root / "etc/group").read_text() == "root:x:0:\npostfix:x:111:\npostdrop:x:112:\n"
    assert (spool.stat().st_uid, spool.stat().st_gid) == (108, 111)
    assert (tool.stat().st_gid, stat.S_IMODE(tool.stat().st_mode)) == (112, 0o2555)  # set-gid kept


def test_bind_paths_drop_what_a_parent_brings() -> None:
    assert bind_paths(["/tmp/a", "/tmp", "/srv/x/", "/srv/xy", "/srv/x/lua"]) == [
        "/tmp", "/srv/x", "/srv/xy"]


def test_host_release_name_comes_from_os_release(tmp_path: Path) -> None:
    (tmp_path / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nVERSION_ID="13"\n')
    assert host_debian(tmp_path / "os-release") == "debian13"


def test_a_root_command_runs_chrooted_in_its_own_mount_namespace() -> None:
    release = Release("debian13", Path("/var/cache/x/debian13"))
    command = release.command(["postconf", "-n"], binds=["/srv/mail"])
    assert command[:4] == ["unshare", "--mount", "--propagation", "private"]
    assert command[-3:] == ["--", "postconf", "-n"]
    assert "/srv/mail" in command
    assert shown(command) == "chroot /var/cache/x/debian13 postconf -n"
    assert Release("debian12").command(["postconf", "-n"]) == ["postconf", "-n"]


def test_a_missing_root_fails_with_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="scripts/test"):
        Release("debian13", tmp_path).check()


def test_dovecot_fragments_per_release() -> None:
    old, new = fake_release((2, 3)), fake_release((2, 4))
    assert dovecot_mail_location(old, "maildir:/m/%d/%n") == "mail_location = maildir:/m/%d/%n\n"
    assert dovecot_mail_location(new, "maildir:/m/%d/%n") == (
        "mail_driver = maildir\nmail_path = /m/%{user | domain}/%{user | username}\n")
    assert "args = uid=1 home=/h/%u" in dovecot_static_auth(old, "pw", uid="1", home="/h/%u")
    new_auth = dovecot_static_auth(new, "pw", uid="1", home="/h/%u")
    assert "passdb static {\n  password = pw\n}" in new_auth
    assert "    home = /h/%{user}\n" in new_auth


def test_a_dead_runs_directory_goes_and_a_live_ones_stays(tmp_path: Path) -> None:
    dead, live, foreign = tmp_path / "mp-dead", tmp_path / "mp-live", tmp_path / "other"
    for root in (dead, live, foreign):
        root.mkdir()
    child = subprocess.Popen(["true"])
    child.wait()  # its pid now names no process (or a newer one with another start time)
    mark_owner(dead, child.pid)
    mark_owner(live)
    assert stop_dead_runs(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and foreign.exists()


def test_free_port_never_hands_out_a_port_twice() -> None:
    from devrig.instances import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)


def test_a_dovecot24_config_starts_with_the_version_its_conf_names(tmp_path: Path) -> None:
    release = Release("debian99")  # the host's packages, told to be 2.4
    release.__dict__["dovecot_version"] = (2, 4)
    dovecot = Dovecot(tmp_path, release=release,
                      conf="auth_mechanisms = plain\ndovecot_config_version = 2.4.1\n")
    dovecot.write()
    lines = dovecot.config_path.read_text().splitlines()
    assert lines[:2] == ["dovecot_config_version = 2.4.1", "dovecot_storage_version = 2.4.0"]
    assert sum(line.startswith("dovecot_config_version") for line in lines) == 1
    assert "auth_allow_cleartext = yes" in lines and "disable_plaintext_auth = no" not in lines


def test_a_dovecot23_config_keeps_the_old_names(tmp_path: Path) -> None:
    release = Release("debian98")
    release.__dict__["dovecot_version"] = (2, 3)
    dovecot = Dovecot(tmp_path, release=release, conf="", lmtp_port=2424)
    dovecot.write()
    text = dovecot.config_path.read_text()
    assert "dovecot_config_version" not in text and "disable_plaintext_auth = no" in text
    assert "address = 127.0.0.1\n    port = 2424" in text


def test_the_mirror_comes_from_either_sources_format(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text("# deb http://old.example/debian trixie main\n"
                                           "deb [arch=amd64] http://one.example/debian bookworm main\n")
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: trixie-security\n\n"
        "Types: deb deb-src\nURIs: http://two.example/debian\nSuites: trixie trixie-updates\n"
        "Components: main\n")
    assert apt_mirror("bookworm", tmp_path) == "http://one.example/debian"
    assert apt_mirror("trixie", tmp_path) == "http://two.example/debian"
    assert apt_mirror("forky", tmp_path) is None


def test_demo_passwords_never_look_like_an_option() -> None:
    from devrig.localstack import demo_password

    passwords = {demo_password() for _ in range(500)}
    assert len(passwords) == 500
    assert all(len(p) == 16 and p.isalnum() for p in passwords)


def test_the_local_stack_stops_every_part_even_after_one_fails() -> None:
    stopped: list[str] = []

    class Part:
        def __init__(self, name: str, fails: bool = False) -> None:
            self.name, self.fails = name, fails

        def stop(self) -> None:
            stopped.append(self.name)
            if self.fails:
                raise TimeoutError(f"timed out waiting for {self.name} to exit")

    stack = SimpleNamespace(dovecot=Part("dovecot", fails=True), postfix=Part("postfix"),
                            daemons=Part("daemons"))
    with pytest.raises(RuntimeError, match="dovecot to exit"):
        LocalStack.stop(stack)
    assert stopped == ["dovecot", "postfix", "daemons"]
