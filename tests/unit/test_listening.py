"""Listening sockets made once by the worker supervisor: endpoint strings read as Twisted reads
them, sockets bound as Twisted would bind them, descriptors named per listener key."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from mailplugins.config import ConfigError, parse_config
from mailplugins.daemon import configured_listeners
from mailplugins.listening import bind, decode_fds, encode_fds, listen_request


def test_endpoint_strings_are_read_as_twisted_reads_them() -> None:
    tcp = listen_request("tcp:9640:interface=127.0.0.1:backlog=77")
    assert (tcp.kind, tcp.address, tcp.interface, tcp.backlog) == ("tcp", 9640, "127.0.0.1", 77)
    unix = listen_request("unix:/run/x.sock:mode=660")
    assert (unix.kind, unix.address, unix.mode) == ("unix", "/run/x.sock", 0o660)
    six = listen_request("tcp6:9640:interface=\\:\\:1")
    assert (six.kind, six.interface) == ("tcp", "::1")


def test_a_systemd_name_systemd_did_not_pass_is_a_key_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyError):
        listen_request("systemd:domain=UNIX:name=nothing-passed-this")


def test_unix_socket_bound_with_its_mode_listening_and_inheritable(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    sock = bind(listen_request(f"unix:{path}:mode=640"))
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        assert sock.get_inheritable() and not sock.getblocking()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))  # listening: the kernel queues it
        client.close()
    finally:
        sock.close()


def test_tcp_socket_bound_on_its_interface() -> None:
    sock = bind(listen_request("tcp:0:interface=127.0.0.1"))
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        socket.create_connection((host, port), timeout=5).close()
    finally:
        sock.close()


def test_descriptors_by_listener_key_round_trip() -> None:
    fds = {"authd.sasl_listen": 4, "authd.dict_listen[0]": 5, "authd.dict_listen[1]": 6}
    assert decode_fds(encode_fds(fds)) == fds
    assert decode_fds("") == {}


def test_listener_keys_from_the_config_match_the_daemons_naming(tmp_path: Path) -> None:
    config = parse_config({
        "database": {"url": f"sqlite:///{tmp_path}/m.db"},
        "authd": {"sasl_listen": "tcp:1", "dict_listen": ["tcp:2", "tcp:3"], "metrics": "tcp:4"},
    })
    assert configured_listeners("authd", config.authd) == [
        ("authd.sasl_listen", "tcp:1"), ("authd.dict_listen[0]", "tcp:2"),
        ("authd.dict_listen[1]", "tcp:3"),
    ]


@pytest.mark.parametrize(("section", "message"), [
    ({"workers": 0}, "deliver.workers: must be at least 1"),
    ({"workers": 65}, "deliver.workers: must be at most 64"),
    ({"workers": "2"}, "deliver.workers: expected an integer"),
])
def test_workers_bounds(tmp_path: Path, section: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"database": {"url": f"sqlite:///{tmp_path}/m.db"},
                      "deliver": {"listen": "tcp:1", **section}})
    assert str(info.value).startswith(message)


def test_authd_workers_need_shared_penalties(tmp_path: Path) -> None:
    base = {"database": {"url": f"sqlite:///{tmp_path}/m.db"}}
    with pytest.raises(ConfigError, match="authd.workers: more than one worker needs penalty_shared"):
        parse_config({**base, "authd": {"sasl_listen": "tcp:1", "workers": 2, "penalty_shared": False}})
    config = parse_config({**base, "authd": {"sasl_listen": "tcp:1", "workers": 2}})
    assert config.authd is not None and config.authd.workers == 2
