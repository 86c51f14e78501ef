# -*- test-case-name: tests.unit.test_authd_maildir_path -*-
"""Expand ``mail.location`` for one mailbox exactly as Dovecot expands ``mail_location``.

authd tells Dovecot where a mailbox lives (the userdb ``mail`` and ``home`` fields) and deliver
writes into it; both call :func:`expand_location` so the two can never disagree.

**One login spelling, one mailbox: paths use the lower-case address.** The variables see the
local part and domain lower-cased (ASCII letters only, as Dovecot's ``%L`` and ``| lower`` do),
whatever the spelling stored in the database or typed at login: ``Alice@``, ``alice@`` and
``ALICE@`` all live in ``.../alice/Maildir``. Dovecot lower-cases logins by default
(``auth_username_format``), so a path Dovecot computes itself from the login agrees too.

:func:`dovecot24_template` writes a template in Dovecot 2.4's ``%{user | username}`` syntax,
refusing what it cannot write exactly (2.4 takes an unknown ``%x`` literally, silently).

Supported syntax (the subset of Dovecot 2.3 ``var_expand`` that makes sense for a path):

- ``%u`` / ``%{user}``: ``local@domain``; ``%n`` / ``%{username}``: the local part;
  ``%d`` / ``%{domain}``: the domain; ``%%``: a literal ``%``.
- Modifiers before the variable: ``%L`` lower-cases and ``%U`` upper-cases it (``%Ln``, ``%Ud``).
- Truncation as Dovecot does it: ``%[offset.]width<var>``: ``%1n`` or ``%0.1n`` is the first
  character, ``%1.1n`` the second, ``%2.0n`` all but the first two (a width of 0 means "to the
  end"). Dovecot's negative offsets and widths are refused rather than guessed at.

Safety: a local part or domain containing ``/`` or NUL, or equal to ``.``/``..``, and any
expansion whose path contains a ``.`` or ``..`` component, raise :class:`ValueError`, so no
mailbox name can ever climb out of (or collapse onto) the Maildir root.
"""

from __future__ import annotations

__all__ = ["canonical", "check_template", "dovecot24_template", "expand_location", "split_home"]

_LONG_NAMES = {"user": "u", "username": "n", "domain": "d"}
_MODIFIERS = "LU"


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_ASCII_UPPER = str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def canonical(text: str) -> str:
    """The canonical spelling of a login or path part: ASCII letters lower-cased, like Dovecot."""
    return text.translate(_ASCII_LOWER)


def _check_part(kind: str, value: str) -> None:
    if not value:
        raise ValueError(f"empty {kind}")
    if "/" in value or "\0" in value:
        raise ValueError(f"{kind} contains '/' or NUL")
    if value in (".", ".."):
        raise ValueError(f"{kind} is '.' or '..'")


def _truncate(value: str, offset: int, width: int) -> str:
    """Dovecot's ``[offset.]width``: skip ``offset`` characters, then keep ``width`` (0 = all)."""
    value = value[offset:]
    return value[:width] if width else value


def _tokens(template: str) -> list[tuple[str, int, int, str, str]]:
    """``template`` as (literal, offset, width, modifiers, variable) pieces; variable "" = literal."""
    out: list[tuple[str, int, int, str, str]] = []
    i = 0
    n = len(template)
    while i < n:
        c = template[i]
        if c != "%":
            out.append((c, 0, 0, "", ""))
            i += 1
            continue
        i += 1
        if i >= n:
            raise ValueError("template ends with a lone '%'")
        if template[i] == "%":
            out.append(("%", 0, 0, "", ""))
            i += 1
            continue
        if template[i] == "-":
            raise ValueError("negative offsets and widths in '%' variables are not supported")
        width = 0
        while i < n and template[i] in "0123456789":
            width = width * 10 + int(template[i])
            i += 1
        offset = 0
        if i < n and template[i] == ".":
            offset = width
            width = 0
            i += 1
            while i < n and template[i] in "0123456789":
                width = width * 10 + int(template[i])
                i += 1
        modifiers = ""
        while i < n and template[i] in _MODIFIERS:
            modifiers += template[i]
            i += 1
        if i >= n:
            raise ValueError("template ends inside a '%' variable")
        if template[i] == "{":
            end = template.find("}", i)
            if end < 0:
                raise ValueError("unterminated %{...} variable")
            name = _LONG_NAMES.get(template[i + 1 : end])
            if name is None:
                raise ValueError(f"unsupported variable %{{{template[i + 1:end]}}}")
            i = end + 1
        else:
            name = template[i]
            if name not in "und":
                raise ValueError(f"unsupported variable %{name}")
            i += 1
        out.append(("", offset, width, modifiers, name))
    return out


def _expand(template: str, variables: dict[str, str]) -> str:
    out: list[str] = []
    for literal, offset, width, modifiers, name in _tokens(template):
        if not name:
            out.append(literal)
            continue
        value = _truncate(variables[name], offset, width)
        for modifier in modifiers:
            value = canonical(value) if modifier == "L" else value.translate(_ASCII_UPPER)
        out.append(value)
    return "".join(out)


#: Dovecot 2.4 spelling of each variable (``%{user}`` is the login, after auth_username_format).
_V24 = {"u": "user", "n": "user | username", "d": "user | domain"}


def dovecot24_template(template: str) -> str:
    """``template`` in Dovecot 2.4's syntax, expanding exactly as :func:`expand_location` does.

    Every variable gets ``| lower`` (the canonical spelling); truncation becomes ``substr``.
    Raises ValueError (naming what is wrong) for what 2.4 cannot say exactly: a literal ``%``
    (2.4 keeps ``%%`` as two characters and reads ``%{`` as a variable).
    """
    out: list[str] = []
    for literal, offset, width, modifiers, name in _tokens(template):
        if not name:
            if literal == "%":
                raise ValueError("a literal '%' ('%%') has no exact Dovecot 2.4 spelling")
            out.append(literal)
            continue
        filters = [_V24[name], "lower"]
        if offset or width:
            filters.append(f"substr({offset}, {width})" if width else f"substr({offset})")
        for modifier in modifiers:
            wanted = "lower" if modifier == "L" else "upper"
            if filters[-1] != wanted:  # "%Ln" is already lower-case
                filters.append(wanted)
        out.append("%{" + " | ".join(filters) + "}")
    return "".join(out)


def split_home(template: str) -> tuple[str, str]:
    """(home, Maildir) templates: a location ending in ``/Maildir`` has its parent as home."""
    stripped = template.rstrip("/")
    if stripped.endswith("/Maildir") and len(stripped) > len("/Maildir"):
        return stripped[: -len("/Maildir")], template
    return template, template


def expand_location(template: str, local: str, domain: str, *, lower: bool = True) -> str:
    """The Maildir path of ``local@domain`` under ``template`` (``mail.location``).

    The variables see the canonical (lower-case) spelling, whatever case ``local`` has;
    ``lower=False`` gives the path of the spelling as given (where mailplugins before the
    canonical spelling wrote, for ``doctor`` to find mail left there).

    Raises ValueError for an unsafe local part/domain or an unsupported template.
    """
    _check_part("local part", local)
    _check_part("domain", domain)
    if lower:
        local, domain = canonical(local), canonical(domain)
    path = _expand(template, {"u": f"{local}@{domain}", "n": local, "d": domain})
    for component in path.split("/"):
        if component in (".", ".."):
            raise ValueError("expanded location contains a '.' or '..' component")
    return path


def check_template(template: str) -> None:
    """Raise ValueError if ``template`` uses syntax :func:`expand_location` does not support."""
    expand_location(template, "user", "example.org")
