# -*- test-case-name: tests.unit.test_wiring_doctor -*-
"""What Postfix and Dovecot say is configured: ``postconf`` and ``doveconf`` output, parsed.

Parsing is a pure function of the text, so the doctor is tested on canned output;
:func:`run_postconf` and :func:`run_doveconf` are the only parts that start processes.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "DovecotLive",
    "PostfixLive",
    "parse_doveconf",
    "parse_postconf",
    "parse_postconf_master",
    "parse_postconf_params",
    "run_doveconf",
    "run_postconf",
]


def _logical_lines(text: str) -> list[str]:
    """Join main.cf/master.cf continuation lines (those starting with whitespace)."""
    lines: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace() and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(line.strip())
    return lines


def parse_postconf(text: str) -> dict[str, str]:
    """``name = value`` lines of ``postconf -n``/``-d`` (values may be empty)."""
    values: dict[str, str] = {}
    for line in _logical_lines(text):
        if "=" not in line:
            continue
        name, _, value = line.partition("=")
        values[name.strip()] = value.strip()
    return values


def parse_postconf_master(text: str) -> dict[tuple[str, str], list[str]]:
    """``postconf -M`` (or master.cf): (service, type) -> the eight fields and arguments."""
    services: dict[tuple[str, str], list[str]] = {}
    for line in _logical_lines(text):
        fields = line.split()
        if len(fields) >= 8:
            services[(fields[0], fields[1])] = fields
    return services


def parse_postconf_params(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """``postconf -P``: ``service/type/name = value`` -> {(service, type): {name: value}}."""
    params: dict[tuple[str, str], dict[str, str]] = {}
    for line in text.splitlines():
        if "=" not in line:
            continue
        key, _, value = line.partition("=")
        parts = key.strip().split("/")
        if len(parts) != 3:
            continue
        params.setdefault((parts[0], parts[1]), {})[parts[2]] = value.strip()
    return params


@dataclass(frozen=True)
class DovecotLive:
    settings: Mapping[str, str]
    passdbs: tuple[Mapping[str, str], ...]
    userdbs: tuple[Mapping[str, str], ...]
    #: Every ``name = value`` at any depth (a userdb's ``fields { home = ... }`` too), in order.
    everywhere: tuple[tuple[str, str], ...] = ()

    @property
    def release(self) -> str:
        """``2.4`` when the configuration is 2.4's (it must start with dovecot_config_version)."""
        return "2.4" if "dovecot_config_version" in self.settings else "2.3"


#: Blocks whose settings are not flattened into ``section_name`` settings.
_NAMED_KINDS = frozenset({"passdb", "userdb", "service", "protocol", "namespace", "remote", "local",
                          "local_name", "mailbox", "plugin", "dict", "dict_server", "unix_listener",
                          "inet_listener", "fifo_listener", "quota", "sql_driver", "fs"})


def parse_doveconf(text: str) -> DovecotLive:
    """Top-level settings and passdb/userdb blocks of ``doveconf -n`` or ``-a``, 2.3 or 2.4.

    2.4 writes named blocks (``passdb lua { lua_file = ... }``: the driver defaults to the
    name) and groups some settings in a block named after their prefix (``ssl_server {
    cert_file = ... }`` is ``ssl_server_cert_file``), which is how they are reported here.
    """
    settings: dict[str, str] = {}
    passdbs: list[dict[str, str]] = []
    userdbs: list[dict[str, str]] = []
    everywhere: list[tuple[str, str]] = []
    stack: list[str] = []  # the header word of each open block
    current: dict[str, str] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("{"):
            words = line[:-1].split()
            kind = words[0] if words else ""
            if not stack:
                current = {} if kind in ("passdb", "userdb") else None
                if current is not None:
                    if len(words) > 1:  # 2.4: passdb NAME { }
                        current["name"] = words[1]
                        current["driver"] = words[1]
                    (passdbs if kind == "passdb" else userdbs).append(current)
            stack.append(kind if len(words) == 1 else "")
            continue
        if line == "}":
            if stack:
                stack.pop()
            if not stack:
                current = None
            continue
        name, sep, value = line.partition("=")
        if not sep:
            continue
        name, value = name.strip(), value.strip()
        everywhere.append((name, value))
        if not stack:
            settings[name] = value
        elif len(stack) == 1 and current is not None:
            current[name] = value
        elif len(stack) == 1 and stack[0] and stack[0] not in _NAMED_KINDS:
            settings[f"{stack[0]}_{name}"] = value  # 2.4: ssl_server { cert_file } and friends
    return DovecotLive(settings, tuple(passdbs), tuple(userdbs), tuple(everywhere))


@dataclass(frozen=True)
class PostfixLive:
    #: Effective main.cf values: ``postconf -d`` overlaid with ``postconf -n``.
    main: Mapping[str, str]
    services: Mapping[tuple[str, str], Sequence[str]]
    params: Mapping[tuple[str, str], Mapping[str, str]]

    @classmethod
    def from_text(cls, n: str, d: str = "", m: str = "", p: str = "") -> PostfixLive:
        main = parse_postconf(d)
        main.update(parse_postconf(n))
        return cls(main, parse_postconf_master(m), parse_postconf_params(p))


def _run(cmd: Sequence[str]) -> str:
    try:
        result = subprocess.run(  # noqa: S603 - fixed tool names, arguments from our own options
            list(cmd), capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError:
        raise RuntimeError(f"{cmd[0]} not found (is it installed?)") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd)} timed out") from None
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1]
        raise RuntimeError(f"{' '.join(cmd)}: {message}")
    return result.stdout


def run_postconf(config_dir: str | None = None) -> PostfixLive:
    base = ["postconf"] + (["-c", config_dir] if config_dir else [])
    return PostfixLive.from_text(
        n=_run([*base, "-n"]), d=_run([*base, "-d"]), m=_run([*base, "-M"]), p=_run([*base, "-P"])
    )


def run_doveconf(config_file: str | None = None) -> DovecotLive:
    base = ["doveconf"] + (["-c", config_file] if config_file else [])
    effective = parse_doveconf(_run([*base, "-a"]))
    configured = parse_doveconf(_run([*base, "-n"]))
    return DovecotLive(effective.settings, configured.passdbs, configured.userdbs,
                       configured.everywhere)
