# -*- test-case-name: tests.unit.test_wiring_dovecot -*-
"""The dovecot.conf snippet that makes stock Dovecot ask authd (dict on 2.3, Lua over HTTP on 2.4).

A pure function of a :class:`~mailplugins.config.Config` and :class:`DovecotOptions`, like
:mod:`mailplugins.wiring.postfix`: ``mailplugins dovecot-config`` renders it, ``mailplugins
doctor`` compares it with ``doveconf``, the end-to-end tests run private Dovecots with it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from mailplugins.config import Config
from mailplugins.maildir_path import dovecot24_template, split_home
from mailplugins.releases import dovecot_release
from mailplugins.wiring import master_passdb
from mailplugins.wiring.endpoints import first_endpoint
from mailplugins.wiring.snippets import DEBIAN_CERT, DEBIAN_KEY, GeneratedFile, Setting, file_header

__all__ = ["DovecotOptions", "DovecotSnippet", "dovecot_conf_text", "dovecot_config", "render_dovecot"]


@dataclass(frozen=True)
class DovecotOptions:
    config_directory: str = "/etc/dovecot"
    #: Lua passdb over authd's HTTP verify endpoint (Dovecot 2.3.17+ and 2.4) instead of dict.
    lua: bool = False
    #: Path of authd's Lua script as installed (authd/lua/mailplugins-auth.lua).
    lua_script: str = ""
    #: Its text, to rewrite the verify URL when http_listen is not the script's default.
    lua_script_text: str | None = None
    tls_cert: str = DEBIAN_CERT
    tls_key: str = DEBIAN_KEY
    ssl: str = "required"
    postfix_queue_directory: str = "/var/spool/postfix"
    #: Dovecot major.minor to write for: ``2.3`` (Debian 12) or ``2.4`` (Debian 13).
    version: str = "2.3"
    #: 2.4's ``dovecot_config_version``: it must equal the value at the top of dovecot.conf
    #: (Dovecot refuses to change it once set), and Debian 13's dovecot.conf says 2.4.0.
    config_version: str = "2.4.0"


@dataclass(frozen=True)
class DovecotSnippet:
    source: str
    settings: tuple[Setting, ...]
    #: passdb/userdb blocks for the doctor: 2.3 ``{"driver", "args"}``; 2.4 ``{"name", "driver",
    #: "lua_file"}`` (a named block, its driver defaulting to its name).
    passdbs: tuple[Mapping[str, str], ...]
    userdbs: tuple[Mapping[str, str], ...]
    blocks: tuple[str, ...]
    files: tuple[GeneratedFile, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)
    version: str = "2.3"


_LUA_URL = re.compile(r"http://(?:127\.0\.0\.1|localhost|\[::1\]):\d+")


def _dict_file(config: Config, options: DovecotOptions) -> tuple[str, GeneratedFile]:
    assert config.authd is not None
    endpoint = first_endpoint(config.authd.dict_listen, "authd.dict_listen")
    if endpoint.kind != "unix":
        raise ValueError("authd.dict_listen: Dovecot's dict proxy client needs a unix socket")
    path = os.path.join(options.config_directory, "mailplugins-dict-auth.conf.ext")
    text = "\n".join([
        "# Dovecot dict passdb/userdb answered by mailplugins authd (dict proxy protocol).",
        "# No idle_msecs in the uri: Dovecot 2.3.19 auth workers panic with it.",
        f"uri = proxy:{endpoint.path}:auth",
        "iterate_prefix = userdb/",
        "key passdb {",
        "  key = passdb/%s/%u",
        "  format = json",
        "}",
        "key userdb {",
        "  key = userdb/%u",
        "  format = json",
        "}",
        "passdb_objects = passdb",
        "userdb_objects = userdb",
    ]) + "\n"
    return path, GeneratedFile(path, text, 0o640, "passdb key names the service, so per-service flags apply",
                               group="dovecot")


def _lua_script(
    config: Config, options: DovecotOptions, warnings: list[str]
) -> tuple[str, list[GeneratedFile]]:
    assert config.authd is not None
    endpoint = first_endpoint(config.authd.http_listen, "authd.http_listen")
    if endpoint.kind != "inet":
        raise ValueError("authd.http_listen: Dovecot's Lua HTTP client needs a TCP listener")
    url = f"http://{endpoint.inet()}"
    if not options.lua_script:
        raise ValueError("authd's Lua script is not installed (authd/lua/mailplugins-auth.lua)")
    text = options.lua_script_text
    if text is None:
        return options.lua_script, []
    found = set(_LUA_URL.findall(text))
    if not found:
        warnings.append(f"{options.lua_script}: no http://127.0.0.1:PORT URL found; check it calls {url}")
        return options.lua_script, []
    if found == {url}:
        return options.lua_script, []
    path = os.path.join(options.config_directory, "mailplugins-auth.lua")
    rewritten = _LUA_URL.sub(url, text)
    return path, [GeneratedFile(path, rewritten, 0o644,
                                f"authd's script with the verify URL set to {url}")]


def _static_userdb(config: Config) -> dict[str, str]:
    location = config.mail.location
    home = location[: -len("/Maildir")] if location.endswith("/Maildir") else location
    return {
        "driver": "static",
        "args": f"uid={config.mail.uid} gid={config.mail.gid} home={home} "
                f"mail=maildir:{location} allow_all_users=yes",
    }


def _block(kind: str, values: Mapping[str, str]) -> str:
    name = values.get("name")
    head = f"{kind} {name}" if name else kind
    inner = "".join(f"  {key} = {value}\n" for key, value in values.items()
                    if key != "name" and not (key == "driver" and value == name))
    return f"{head} {{\n{inner}}}"


def _separator(config: Config) -> list[Setting]:
    """``user<sep>master`` logins, when authd.master_user_separator is set."""
    assert config.authd is not None
    separator = config.authd.master_user_separator
    if not separator:
        return []
    return [Setting("auth_master_user_separator", separator,
                    "user<separator>master logs a master user in (authd.master_user_separator)")]


def _listener_blocks(config: Config, options: DovecotOptions) -> list[str]:
    """Dovecot's own auth socket for Postfix (no authd SASL) and LMTP socket (no deliver)."""
    blocks = []
    if config.authd is not None and not config.authd.sasl_listen:
        auth_socket = os.path.join(options.postfix_queue_directory, "private", "auth")
        blocks.append(
            "service auth {\n"
            f"  unix_listener {auth_socket} {{\n"
            "    mode = 0660\n    user = postfix\n    group = postfix\n  }\n}"
        )
    if config.deliver is None:
        lmtp_socket = os.path.join(options.postfix_queue_directory, "private", "dovecot-lmtp")
        blocks.append(
            "service lmtp {\n"
            f"  unix_listener {lmtp_socket} {{\n"
            "    mode = 0600\n    user = postfix\n    group = postfix\n  }\n}"
        )
    return blocks


def _dovecot24(config: Config, options: DovecotOptions) -> DovecotSnippet:
    """Dovecot 2.4: new setting names, named blocks, ``%{user | domain}`` variables, Lua only.

    2.4 has no dict passdb/userdb, so the Lua script asks authd over HTTP for everything: the
    password check, the userdb (home, Maildir, uid/gid, quota, canonical name) and the user
    list (``doveadm -A``). Unknown users stay unknown: no ``allow_all_users`` catch-all.
    """
    assert config.authd is not None
    warnings: list[str] = []
    files: list[GeneratedFile] = []
    if not config.authd.http_listen:
        raise ValueError("authd.http_listen is not set: Dovecot 2.4 has no dict passdb, "
                         "it asks authd over HTTP (Lua)")
    location = config.mail.location
    try:
        home, maildir = (dovecot24_template(part) for part in split_home(location))
    except ValueError as exc:
        raise ValueError(f"mail.location: {exc}") from None
    settings = [
        Setting("dovecot_config_version", options.config_version,
                "must equal the value at the top of dovecot.conf (Debian 13's says 2.4.0)",
                check="none"),
        Setting("dovecot_storage_version", options.config_version, check="none"),
        Setting("auth_mechanisms", "plain login", "hashed passwords allow PLAIN and LOGIN only"),
        Setting("auth_allow_cleartext", "no", "no password before STARTTLS"),
        Setting("ssl", options.ssl),
        Setting("ssl_server_cert_file", options.tls_cert, check="nonempty"),
        Setting("ssl_server_key_file", options.tls_key, check="nonempty"),
        Setting("ssl_min_protocol", "TLSv1.2", check="none"),
        Setting("mail_driver", "maildir", "mail.location: where deliver writes"),
        Setting("mail_home", home),
        Setting("mail_path", maildir),
        Setting("mail_inbox_path", maildir,
                "INBOX is the Maildir itself (Debian's 10-mail.conf says /var/mail/...; left "
                "empty, 2.4 makes INBOX a folder .INBOX)"),
        Setting("mail_uid", str(config.mail.uid), "owner of the Maildirs (deliver runs as this user)"),
        Setting("mail_gid", str(config.mail.gid)),
        Setting("first_valid_uid", str(min(config.mail.uid, 500)), check="none"),
    ]
    script, extra = _lua_script(config, options, warnings)
    files += extra
    lua = {"name": "lua", "driver": "lua", "lua_file": script}
    master = master_passdb.master_of(lua, "2.4")
    settings += _separator(config)
    blocks = [
        # Without an inbox namespace 2.4 opens "INBOX" as a folder .INBOX, not the Maildir
        # root deliver writes to (Debian's 10-mail.conf has it; a bare dovecot.conf does not).
        "namespace inbox {\n  inbox = yes\n}",
        "# master users (mailplugins user master ADDRESS on): asked only for a master login",
        _block("passdb", master), _block("passdb", lua), _block("userdb", lua),
    ]
    if config.authd.dict_listen:
        endpoint = first_endpoint(config.authd.dict_listen, "authd.dict_listen")
        if endpoint.kind != "unix":
            raise ValueError("authd.dict_listen: Dovecot's dict proxy client needs a unix socket")
        blocks += [
            "# last_login records each login's time through authd's dict socket",
            "mail_plugins {\n  last_login = yes\n}",
            "last_login {\n  dict proxy {\n"
            f"    dict_proxy_socket_path = {endpoint.path}\n"
            "    dict_proxy_name = lastlogin\n  }\n}",
        ]
    blocks += _listener_blocks(config, options)
    return DovecotSnippet(
        source=config.source,
        settings=tuple(settings),
        passdbs=(master, lua),
        userdbs=(lua,),
        blocks=tuple(blocks),
        files=tuple(files),
        warnings=tuple(warnings),
        version="2.4",
    )


def dovecot_config(config: Config, options: DovecotOptions | None = None) -> DovecotSnippet:
    """The dovecot.conf snippet for ``config``; ValueError if authd cannot serve Dovecot."""
    options = options or DovecotOptions()
    if config.authd is None:
        raise ValueError("authd is not configured: Dovecot needs authd's dict or HTTP listener")
    if dovecot_release(options.version) == "2.4":
        return _dovecot24(config, options)
    warnings: list[str] = []
    files: list[GeneratedFile] = []
    settings = [
        Setting("auth_mechanisms", "plain login", "hashed passwords allow PLAIN and LOGIN only"),
        Setting("disable_plaintext_auth", "yes", "no password before STARTTLS"),
        Setting("ssl", options.ssl),
        Setting("ssl_cert", f"<{options.tls_cert}", check="nonempty"),
        Setting("ssl_key", f"<{options.tls_key}", check="nonempty"),
        Setting("ssl_min_protocol", "TLSv1.2", check="none"),
        Setting("mail_location", f"maildir:{config.mail.location}",
                "where deliver writes (mail.location); authd's userdb answers the same path"),
        Setting("mail_uid", str(config.mail.uid), "owner of the Maildirs (deliver runs as this user)"),
        Setting("mail_gid", str(config.mail.gid)),
        Setting("first_valid_uid", str(min(config.mail.uid, 500)), check="none"),
    ]
    passdbs: list[dict[str, str]] = []
    userdbs: list[dict[str, str]] = []
    dict_args = ""
    if config.authd.dict_listen:
        dict_args, dict_file = _dict_file(config, options)
        files.append(dict_file)
    if options.lua:
        script, extra = _lua_script(config, options, warnings)
        files += extra
        passdbs.append({"driver": "lua", "args": f"file={script} blocking=yes"})
    elif dict_args:
        passdbs.append({"driver": "dict", "args": dict_args})
    else:
        raise ValueError("authd.dict_listen is not set: use --lua (HTTP verify) or add dict_listen")
    # Master users: a master passdb before the ordinary one (wiring/master_passdb.py).
    if options.lua:
        passdbs.insert(0, master_passdb.master_of(passdbs[0], "2.3"))
    else:
        socket_path = first_endpoint(config.authd.dict_listen, "authd.dict_listen").path
        master_path = master_passdb.dict_master_path(options.config_directory)
        files.append(GeneratedFile(master_path, master_passdb.dict_master_text(socket_path), 0o640,
                                   "master users' passdb: authd answers only for them",
                                   group="dovecot"))
        passdbs.insert(0, {"driver": "dict", "args": master_path, "master": "yes", "pass": "yes"})
    settings += _separator(config)
    if dict_args:
        userdbs.append({"driver": "dict", "args": dict_args})
    else:
        warnings.append(
            "no authd.dict_listen: the static userdb accepts any user name (allow_all_users), so "
            "Dovecot's LMTP and doveadm take unknown users too; add dict_listen for a real userdb"
        )
        userdbs.append(_static_userdb(config))
    blocks = [_block("passdb", p) for p in passdbs] + [_block("userdb", u) for u in userdbs]
    if config.authd.dict_listen:
        socket_path = first_endpoint(config.authd.dict_listen, "authd.dict_listen").path
        blocks += [
            "# last_login records each login's time through authd's dict socket",
            "mail_plugins = $mail_plugins last_login",
            f"plugin {{\n  last_login_dict = proxy:{socket_path}:lastlogin\n"
            "  last_login_key = last-login/%u\n}",
        ]
    blocks += _listener_blocks(config, options)
    return DovecotSnippet(
        source=config.source,
        settings=tuple(settings),
        passdbs=tuple(passdbs),
        userdbs=tuple(userdbs),
        blocks=tuple(blocks),
        files=tuple(files),
        warnings=tuple(warnings),
    )


def render_dovecot(snippet: DovecotSnippet, *, with_files: bool = True) -> str:
    out = file_header("dovecot-config", snippet.source)
    out.append(f"# For Dovecot {snippet.version} (dovecot-config --dovecot-version picks another).")
    out += [f"# WARNING: {text}" for text in snippet.warnings]
    out += [
        "# Put it in /etc/dovecot/conf.d/99-mailplugins.conf and comment out",
        "# '!include auth-system.conf.ext' in conf.d/10-auth.conf (passdbs add up, they do not override).",
        "",
    ]
    for setting in snippet.settings:
        if setting.comment:
            out.append(f"# {setting.comment}")
        out.append(f"{setting.name} = {setting.value}".rstrip())
    out += ["", *list(snippet.blocks)]
    if with_files:
        for generated in snippet.files:
            out += ["", f"# ---- {generated.path} (mode {generated.mode:04o}; {generated.comment}) ----"]
            out += generated.text.rstrip("\n").splitlines()
    return "\n".join(out) + "\n"


def dovecot_conf_text(snippet: DovecotSnippet) -> str:
    """Only the dovecot.conf part (no companion files), for writing or testing."""
    return render_dovecot(snippet, with_files=False)
