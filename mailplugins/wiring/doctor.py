# -*- test-case-name: tests.unit.test_wiring_doctor -*-
"""``mailplugins doctor``: compare the live Postfix and Dovecot settings with the generated ones.

The expectations come from :mod:`mailplugins.wiring.postfix` (one source of truth); the live values
from ``postconf -n`` (over ``postconf -d`` for what is left at its default), ``postconf -M``/``-P``
for master.cf, and ``doveconf -n``/``doveconf -a``. Comparing is a pure function of that text
(read by :mod:`mailplugins.wiring.live`), so it is tested on canned output.

Every finding names the file, what is wrong, and the line that fixes it.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pwd
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from mailplugins.maildir_path import dovecot24_template, expand_location, split_home
from mailplugins.records import MailboxRecord
from mailplugins.wiring.dovecot import DovecotSnippet
from mailplugins.wiring.live import DovecotLive, PostfixLive
from mailplugins.wiring.postfix import PostfixSnippet
from mailplugins.wiring.snippets import Setting

__all__ = [
    "Finding",
    "check_domains",
    "check_dovecot",
    "check_dovecot_files",
    "check_mailbox_paths",
    "check_postfix",
    "literal_variables",
]


@dataclass(frozen=True)
class Finding:
    where: str
    problem: str
    fix: str

    def render(self) -> str:
        """Two lines (what is wrong, the fix), or one when the problem says it all (DNS)."""
        if not self.fix:
            return f"{self.where}: {self.problem}"
        return f"{self.where}: {self.problem}\n    fix: {self.fix}"


# -- Postfix -----------------------------------------------------------------------------------------


def _normal(value: str) -> str:
    value = re.sub(r"\s+", " ", value.strip())
    return re.sub(r"\s*([{},=])\s*", r"\1", value)


def split_restrictions(value: str) -> list[str]:
    """A Postfix list split on commas/spaces, keeping ``{ ... }`` groups whole."""
    items: list[str] = []
    depth = 0
    current = ""
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}":
            depth = max(0, depth - 1)
        if depth == 0 and (char in ", \t\n"):
            if current.strip():
                items.append(current.strip())
            current = ""
            continue
        current += char
    if current.strip():
        items.append(current.strip())
    merged: list[str] = []
    for item in items:  # "check_policy_service" followed by its "{...}" group
        if item.startswith("{") and merged and merged[-1] in ("check_policy_service",):
            merged[-1] += " " + item
        else:
            merged.append(item)
    return merged


def _policy_key(item: str) -> tuple[str, str] | None:
    """(endpoint, policy_context) of a ``check_policy_service`` item, else None."""
    if not item.startswith("check_policy_service"):
        return None
    rest = item[len("check_policy_service"):].strip()
    if rest.startswith("{"):
        parts = [p.strip() for p in rest.strip("{} ").split(",") if p.strip()]
        endpoint = parts[0] if parts else ""
        options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        return endpoint, options.get("policy_context", "").strip()
    return rest, ""


def _expand(value: str, main: Mapping[str, str], depth: int = 3) -> str:
    for _ in range(depth):
        expanded = re.sub(
            r"\$\{?([a-z0-9_]+)\}?", lambda m: main.get(m.group(1), m.group(0)), value
        )
        if expanded == value:
            break
        value = expanded
    return value


def _contains(expected: str, live: str, main: Mapping[str, str]) -> list[str]:
    """Expected list items absent from the live list (policy services by endpoint and context)."""
    live_items = split_restrictions(_expand(live, main))
    live_plain = {_normal(item) for item in live_items}
    live_policies = {key for key in map(_policy_key, live_items) if key is not None}
    missing = []
    for item in split_restrictions(expected):
        key = _policy_key(item)
        if key is not None:
            if key not in live_policies:
                missing.append(item)
        elif _normal(item) not in live_plain:
            missing.append(item)
    return missing


def _milters(value: str) -> dict[str, str]:
    """A Postfix milter list as endpoint -> default_action ("" when not given per milter)."""
    found: dict[str, str] = {}
    for item in split_restrictions(value):
        parts = [p.strip() for p in item.strip("{} ").split(",") if p.strip()]
        if not parts:
            continue
        options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        found[parts[0]] = options.get("default_action", "").strip()
    return found


def milter_problem(expected: str, live: str, main: Mapping[str, str]) -> str | None:
    """Why the live milter list lacks milterd with the expected default action, or None.

    Other milters in the list, other timeouts and spacing are the operator's business; the
    endpoint and the per-direction ``default_action`` are what keep mail safe.
    """
    have = _milters(_expand(live, main))
    fallback = main.get("milter_default_action", "tempfail")
    for endpoint, action in _milters(_expand(expected, main)).items():
        if endpoint not in have:
            return f"lacks {endpoint}"
        actual = have[endpoint] or fallback
        if actual != action:
            return f"has {endpoint} with default_action={actual} (want {action})"
    return None


def _networks(value: str) -> set[str] | None:
    """A Postfix network list as a set of normalised networks; None if it holds other things."""
    found: set[str] = set()
    for item in split_restrictions(value):
        try:
            found.add(str(ipaddress.ip_network(item.replace("[", "").replace("]", ""), strict=False)))
        except ValueError:
            return None
    return found


def _compare(setting: Setting, live: str | None, main: Mapping[str, str]) -> str | None:
    """Why ``live`` does not satisfy ``setting``, or None."""
    shown = "unset" if live is None else repr(live)
    if setting.name == "mynetworks" and live is not None:
        wanted, have = _networks(setting.value), _networks(_expand(live, main))
        if wanted is not None and wanted == have:
            return None
    if setting.check == "none":
        return None
    if setting.check == "nonempty":
        return None if live else f"{setting.name} is {shown}"
    if live is None:
        return None if setting.value == "" else f"{setting.name} is unset"
    if setting.check == "milter":
        problem = milter_problem(setting.value, live, main)
        return f"{setting.name} {problem} (now {live!r})" if problem else None
    if setting.check == "contains":
        missing = _contains(setting.value, live, main)
        return f"{setting.name} lacks {', '.join(missing)} (now {live!r})" if missing else None
    if _normal(live) == _normal(setting.value):
        return None
    if _normal(_expand(live, main)) == _normal(_expand(setting.value, main)):
        return None
    return f"{setting.name} is {shown}"


def check_postfix(expected: PostfixSnippet, live: PostfixLive) -> list[Finding]:
    findings: list[Finding] = []
    main = dict(live.main)
    for setting in expected.main:
        if expected.domains_mode == "list" and setting.name == "virtual_mailbox_domains":
            continue  # compared with the database by check_domains
        problem = _compare(setting, main.get(setting.name), main)
        if problem:
            findings.append(Finding("main.cf", problem,
                                    f"postconf -e '{setting.name} = {setting.value}'"))
    for service in expected.services:
        key = (service.name, service.type)
        fields = live.services.get(key)
        if fields is None:
            findings.append(Finding(
                "master.cf", f"no {service.name}/{service.type} service",
                "append to master.cf:\n" + "\n".join("      " + line for line in service.lines()),
            ))
            continue
        if fields[7] != service.command:
            findings.append(Finding("master.cf", f"{service.name}/{service.type} runs {fields[7]}",
                                    f"postconf -M -e '{service.lines()[0]}'"))
        params = live.params.get(key, {})
        for name, value in service.overrides:
            actual = params.get(name)
            effective = actual if actual is not None else main.get(name)
            if name.startswith("smtpd_") and name.endswith("_restrictions") and value.startswith("$"):
                missing = _contains(_expand(value, main), effective or "", main)
                problem = f"lacks {', '.join(missing)}" if missing else None
            elif name.endswith("_milters"):
                problem = milter_problem(value, effective or "", main)
            elif name in ("syslog_name", "milter_macro_daemon_name"):
                problem = None
            elif effective is None or _normal(_expand(effective, main)) != _normal(_expand(value, main)):
                problem = f"is {'unset' if effective is None else repr(effective)}"
            else:
                problem = None
            if problem:
                findings.append(Finding(
                    "master.cf", f"{service.name}/{service.type}: {name} {problem}",
                    f"postconf -P -e '{service.name}/{service.type}/{name}={value}'",
                ))
    return findings


def check_domains(snippet: PostfixSnippet, live: PostfixLive, db_domains: Iterable[str]) -> list[Finding]:
    """With a static virtual_mailbox_domains list: every database domain must be in it."""
    if snippet.domains_mode != "list":
        return []
    value = _expand(live.main.get("virtual_mailbox_domains", ""), live.main)
    listed = {item.lower() for item in split_restrictions(value)}
    wanted = sorted(set(db_domains))
    missing = [d for d in wanted if d not in listed]
    if not missing:
        return []
    return [Finding(
        "main.cf",
        f"virtual_mailbox_domains lacks {', '.join(missing)} (in the database; mail for it is refused)",
        f"postconf -e 'virtual_mailbox_domains = {', '.join(wanted)}' && postfix reload",
    )]


# -- Dovecot -----------------------------------------------------------------------------------------


def _same_owner(expected: str, live: str, lookup: str) -> bool:
    def number(value: str) -> int | None:
        if value.isdigit():
            return int(value)
        try:
            return pwd.getpwnam(value).pw_uid if lookup == "user" else grp.getgrnam(value).gr_gid
        except KeyError:
            return None

    return number(expected) is not None and number(expected) == number(live)


def _db_text(values: Mapping[str, str]) -> str:
    name = values.get("name")
    inner = "  ".join(f"{k} = {v}" for k, v in values.items()
                      if k != "name" and not (k == "driver" and v == name))
    return (f"{name} " if name else "") + ("{ " + inner + " }" if inner else "{ }")


#: A Dovecot 2.3 variable (``%d``, ``%Ln``, ``%1n``); 2.4 leaves it as it is, silently.
_OLD_VARIABLE = re.compile(r"%(?![%{])-?[0-9.]*[LU]*[A-Za-z]")


def _path_setting(name: str) -> bool:
    return name in ("home", "mail_home", "mail", "mail_location") or (
        name.startswith("mail_") and name.endswith("_path"))


def literal_variables(live: DovecotLive) -> list[Finding]:
    """In a 2.4 configuration, mail paths holding 2.3 variables that 2.4 takes literally."""
    if live.release != "2.4":
        return []
    findings: list[Finding] = []
    for name, value in dict.fromkeys(live.everywhere):
        found = _OLD_VARIABLE.findall(value)
        if not found or not _path_setting(name):
            continue
        try:
            fix = f"{name} = {dovecot24_template(value)}"
        except ValueError:
            fix = f"{name} with 2.4 variables: %{{user | domain}}, %{{user | username}}, %{{user}}"
        findings.append(Finding(
            "dovecot",
            f"{name} = {value}: Dovecot 2.4 takes {', '.join(dict.fromkeys(found))} literally "
            "(every user would share one directory)",
            fix,
        ))
    return findings


def check_dovecot(expected: DovecotSnippet, live: DovecotLive) -> list[Finding]:
    findings: list[Finding] = literal_variables(live)
    if expected.version != live.release:
        return [*findings, Finding(
            "dovecot",
            f"the configuration is Dovecot {live.release}'s, the expected one {expected.version}'s",
            f"mailplugins dovecot-config --dovecot-version {live.release} (or upgrade the config)",
        )]
    for setting in expected.settings:
        actual = live.settings.get(setting.name)
        kind = "user" if setting.name == "mail_uid" else "group"
        if (setting.name in ("mail_uid", "mail_gid") and actual is not None
                and _same_owner(setting.value, actual, kind)):
            continue
        if (setting.name == "auth_mechanisms" and actual is not None
                and set(actual.lower().split()) == set(setting.value.split())):
            continue
        problem = _compare(setting, actual, {})
        if problem:
            findings.append(Finding("dovecot", problem, f"{setting.name} = {setting.value}"))
    for kind, wanted, have in (("passdb", expected.passdbs, live.passdbs),
                               ("userdb", expected.userdbs, live.userdbs)):
        for block in wanted:
            if not any(_same_db(block, other) for other in have):
                findings.append(Finding("dovecot", f"no {kind} {_db_text(block)}",
                                        f"add: {kind} {_db_text(block)}"))
        for other in have:
            if not any(_same_db(block, other) for block in wanted):
                findings.append(Finding(
                    "dovecot",
                    f"extra {kind} {_db_text(other)} is consulted too",
                    "remove it (Debian: comment out '!include auth-system.conf.ext' in "
                    "conf.d/10-auth.conf)",
                ))
    return findings


def _same_db(expected: Mapping[str, str], live: Mapping[str, str]) -> bool:
    """Same driver and the same value for each generated key (2.3's ``args`` and ``master``
    both ways: a master passdb is not the ordinary one)."""
    keys = (set(expected) - {"name"}) | {"driver", "args", "master"}
    return all(_normal(expected.get(key, "")) == _normal(live.get(key, "")) for key in keys)


def _significant(text: str) -> list[str]:
    return [re.sub(r"\s+", " ", line.strip()) for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def read_text(path: str) -> str | None:
    """A file's text; None when it does not exist. Unreadable files raise PermissionError."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def check_dovecot_files(
    expected: DovecotSnippet, read: Callable[[str], str | None] = read_text
) -> list[Finding]:
    """The companion files (dict config, Lua copy) must say what the generator says."""
    findings: list[Finding] = []
    for generated in expected.files:
        try:
            text = read(generated.path)
        except PermissionError:
            continue  # not ours to judge without root; doveconf already parsed it
        if text is None:
            findings.append(Finding("dovecot", f"{generated.path} does not exist",
                                    "mailplugins dovecot-config --write"))
            continue
        wanted, have = _significant(generated.text), _significant(text)
        if wanted != have:
            missing = next((line for line in wanted if line not in have), wanted[0] if wanted else "")
            findings.append(Finding("dovecot", f"{generated.path} differs from the generated file",
                                    f"mailplugins dovecot-config --write (first difference: {missing})"))
    return findings


def check_mailbox_paths(
    location: str, mailboxes: Iterable[MailboxRecord], is_dir: Callable[[str], bool] = os.path.isdir
) -> list[Finding]:
    """Mail left under a mixed-case directory by mailplugins before paths were lower-cased.

    deliver and Dovecot now both use the lower-case spelling (``Alice@`` lives in ``.../alice``);
    a mailbox stored with capitals whose old directory still exists has mail they no longer see.
    Directories this process may not read count as absent (run doctor as root or vmail).
    """
    home_template, _ = split_home(location)
    findings: list[Finding] = []
    for mailbox in mailboxes:
        try:
            old = expand_location(home_template, mailbox.local_part, mailbox.domain, lower=False)
            new = expand_location(home_template, mailbox.local_part, mailbox.domain)
        except ValueError:
            continue
        if old == new or not is_dir(old):
            continue
        fix = (f"merge {old} into {new} (both exist), then remove {old}" if is_dir(new)
               else f"mv {old} {new}")
        findings.append(Finding(
            "mailboxes",
            f"{mailbox.address}: mail in {old} is no longer read (paths are lower-case: {new})",
            fix,
        ))
    return findings
