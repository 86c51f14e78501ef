# -*- test-case-name: tests.unit.test_config -*-
"""Typed reading of one YAML mapping, so that every config error names its key path.

Each section parser takes a :class:`Fields`, asks it for typed values (which converts and
validates them on the spot), and calls :meth:`Fields.done` last, which refuses unknown keys.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
from collections.abc import Callable
from typing import Final, TypeVar

T = TypeVar("T")

#: Most worker processes one daemon may run (a typo like 1000 should not fork-bomb the host).
MAX_WORKERS: Final = 64

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A configuration problem, rendered as one line: ``key.path: what is wrong``."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def describe(value: object) -> str:
    """A short, quoted rendering of a bad value for an error message."""
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f'"{text}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``300s``, ``5m``, ``2d``; ValueError if not."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError("not a duration (use seconds or a number with ms, s, m, h, d or w)")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or a string such as ``50M`` or ``1GiB`` (binary units)."""
    if isinstance(value, bool):
        raise ValueError("not a size")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        unit = (m.group(2) or "").lower()[:1]
        size = int(m.group(1)) * _SIZE_UNITS[unit]
    else:
        raise ValueError("not a size in bytes (use an integer or a number with K, M, G or T)")
    if size < 0:
        raise ValueError("must not be negative")
    return size


def parse_network(value: object) -> IPNetwork:
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise ValueError(f"not an IP network: {describe(value)}")
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        raise ValueError(f"not an IP network: {describe(value)}") from None


def check_endpoint(text: str) -> str:
    """Validate a Twisted server endpoint string without opening anything.

    ``systemd:`` endpoints are checked for syntax only: the inherited sockets exist only in the
    process systemd started, not in ``check-config``.
    """
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.testing import MemoryReactor

    kind = text.split(":", 1)[0].strip().lower()
    if kind == "systemd":
        args = dict(
            part.split("=", 1) for part in text.split(":")[1:] if "=" in part
        )
        if args.get("domain", "").upper() not in ("INET", "INET6", "UNIX"):
            raise ValueError(f"systemd endpoint needs domain=INET, INET6 or UNIX: {describe(text)}")
        if "name" not in args and "index" not in args:
            raise ValueError(f"systemd endpoint needs name= (or index=): {describe(text)}")
        if "index" in args and not args["index"].isdigit():
            raise ValueError(f"systemd endpoint index is not a number: {describe(text)}")
        return text
    if kind == "ssl" and importlib.util.find_spec("OpenSSL") is None:
        raise ValueError(
            f"ssl: endpoints need pyOpenSSL (pip install 'mailplugins[tls]'): {describe(text)}"
        )
    try:
        serverFromString(MemoryReactor(), text)
    except Exception as exc:
        reason = str(exc).strip() or type(exc).__name__
        raise ValueError(f"not a valid endpoint ({reason}): {describe(text)}") from None
    return text


class Fields:
    """One mapping of the config tree, read key by key.

    ``path`` is the dotted key path of the mapping itself ("" at the top).
    """

    def __init__(self, raw: object, path: str = "") -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(path or "<top level>", f"expected a mapping, got {describe(raw)}")
        for key in raw:
            if not isinstance(key, str):
                raise ConfigError(path or "<top level>", f"key {describe(key)} is not a string")
        self._raw: dict[str, object] = raw
        self.where = path
        self._used: set[str] = set()

    def key_path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self._raw and self._raw[key] is not None

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.key_path(key), message)

    def _take(self, key: str, default: object) -> object:
        self._used.add(key)
        value = self._raw.get(key)
        if value is None:
            if default is MISSING:
                raise self.error(key, "required key is missing")
            return default
        return value

    def convert(self, key: str, default: object, fn: Callable[[object], T]) -> T:
        """Read ``key`` through ``fn``; a ValueError from ``fn`` becomes a ConfigError."""
        value = self._take(key, default)
        if value is default and default is not MISSING:
            return value  # type: ignore[return-value]
        try:
            return fn(value)
        except ValueError as exc:
            raise self.error(key, str(exc)) from None

    def string(
        self, key: str, default: str | _Missing = MISSING, *, choices: tuple[str, ...] = ()
    ) -> str:
        def conv(value: object) -> str:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ValueError(f"expected a string, got {describe(value)}")
            text = str(value)
            if choices and text not in choices:
                raise ValueError(f"must be one of {', '.join(choices)}: {describe(text)}")
            return text

        return self.convert(key, default, conv)

    def workers(self, default: int | None = None) -> int:
        """The ``workers`` key: processes serving this daemon (default: one per CPU)."""
        return self.integer("workers", default or os.cpu_count() or 1, minimum=1, maximum=MAX_WORKERS)

    def integer(
        self,
        key: str,
        default: int | _Missing = MISSING,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        def conv(value: object) -> int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"expected an integer, got {describe(value)}")
            return _bounded(value, minimum, maximum)

        return self.convert(key, default, conv)

    def number(
        self, key: str, default: float | _Missing = MISSING, *, minimum: float | None = None
    ) -> float:
        def conv(value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"expected a number, got {describe(value)}")
            return _bounded(float(value), minimum, None)

        return self.convert(key, default, conv)

    def boolean(self, key: str, default: bool | _Missing = MISSING) -> bool:
        def conv(value: object) -> bool:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {describe(value)}")
            return value

        return self.convert(key, default, conv)

    def duration(
        self,
        key: str,
        default: float | _Missing = MISSING,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float:
        return self.convert(key, default, lambda v: _bounded(parse_duration(v), minimum, maximum))

    def size(
        self, key: str, default: int | _Missing = MISSING, *, minimum: int | None = None
    ) -> int:
        return self.convert(key, default, lambda v: _bounded(parse_size(v), minimum, None))

    def endpoint(self, key: str, default: str | _Missing | None = MISSING) -> str | None:
        def conv(value: object) -> str:
            if not isinstance(value, str):
                raise ValueError(f"expected an endpoint string, got {describe(value)}")
            return check_endpoint(value)

        return self.convert(key, default, conv)

    def endpoints(
        self, key: str, default: tuple[str, ...] | _Missing = MISSING
    ) -> tuple[str, ...]:
        """One endpoint string or a list of them."""
        value = self._take(key, default)
        if value is default and default is not MISSING:
            return default  # type: ignore[return-value]
        items = value if isinstance(value, list) else [value]
        if not items:
            raise self.error(key, "needs at least one endpoint")
        result = []
        for index, item in enumerate(items):
            item_path = f"{key}[{index}]" if isinstance(value, list) else key
            if not isinstance(item, str):
                raise self.error(item_path, f"expected an endpoint string, got {describe(item)}")
            try:
                result.append(check_endpoint(item))
            except ValueError as exc:
                raise self.error(item_path, str(exc)) from None
        return tuple(result)

    def items(
        self, key: str, default: tuple[T, ...] | _Missing, fn: Callable[[object], T]
    ) -> tuple[T, ...]:
        """A list whose items go through ``fn``; errors name the item's index."""
        value = self._take(key, default)
        if value is default and default is not MISSING:
            return default  # type: ignore[return-value]
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {describe(value)}")
        result = []
        for index, item in enumerate(value):
            try:
                result.append(fn(item))
            except ValueError as exc:
                raise self.error(f"{key}[{index}]", str(exc)) from None
        return tuple(result)

    def networks(
        self, key: str, default: tuple[IPNetwork, ...] | _Missing = MISSING
    ) -> tuple[IPNetwork, ...]:
        return self.items(key, default, parse_network)

    def strings(
        self, key: str, default: tuple[str, ...] | _Missing = MISSING
    ) -> tuple[str, ...]:
        def conv(value: object) -> str:
            if not isinstance(value, str):
                raise ValueError(f"expected a string, got {describe(value)}")
            return value

        return self.items(key, default, conv)

    def path(
        self,
        key: str,
        default: str | _Missing | None = MISSING,
        *,
        readable: bool = False,
        directory: bool = False,
    ) -> str:
        """An absolute path; ``readable`` files or ``directory`` must exist when the config loads."""

        def conv(value: object) -> str:
            if not isinstance(value, str) or not value:
                raise ValueError(f"expected a path, got {describe(value)}")
            if not os.path.isabs(value):
                raise ValueError(f"must be an absolute path: {describe(value)}")
            if directory and not os.path.isdir(value):
                raise ValueError(f"not a directory: {describe(value)}")
            if readable and not os.access(value, os.R_OK):
                raise ValueError(f"cannot read: {describe(value)}")
            return value

        return self.convert(key, default, conv)

    def section(self, key: str) -> Fields | None:
        """A nested mapping, or None when the key is absent (an empty mapping is present)."""
        self._used.add(key)
        if key not in self._raw:
            return None
        return Fields(self._raw[key], self.key_path(key))

    def sections(self, key: str) -> dict[str, Fields]:
        """A mapping of names to nested mappings (e.g. per-context rule sets)."""
        value = self._take(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping, got {describe(value)}")
        return {str(name): Fields(sub, self.key_path(f"{key}.{name}")) for name, sub in value.items()}

    def done(self) -> None:
        """Refuse keys nobody asked for: a typo must not silently fall back to a default."""
        for key in self._raw:
            if key not in self._used:
                raise self.error(key, "unknown key")


def _bounded(value: T, minimum: float | None, maximum: float | None) -> T:
    number = float(value)  # type: ignore[arg-type]
    if minimum is not None and number < minimum:
        raise ValueError(f"must be at least {minimum:g}, got {value}")
    if maximum is not None and number > maximum:
        raise ValueError(f"must be at most {maximum:g}, got {value}")
    return value
