# -*- test-case-name: tests.unit.test_generators -*-
"""The Postfix and Dovecot settings that wire the stock servers to the daemons as configured.

Pure functions of a :class:`~mailplugins.config.Config` plus a few operator choices (TLS files,
where Postfix's queue lives, which domains exist): ``mailplugins postfix-config`` and
``mailplugins dovecot-config`` render them, ``mailplugins doctor`` compares them with the live
``postconf``/``doveconf`` output, and the end-to-end tests feed them to private stock servers.
Keeping one source for all three is the point: the doctor can never expect something the
generator would not write.

Choices made here, and why (docs/wiring.md says the same for operators):

- **Sockets live under Postfix's queue directory.** Debian runs smtpd chrooted in
  ``/var/spool/postfix``, so ``unix:/var/spool/postfix/private/NAME`` is given to Postfix as
  ``private/NAME`` (relative to the queue directory, valid inside and outside the chroot). A
  socket elsewhere is passed as an absolute path with a warning: it only works unchrooted.
- **``virtual_mailbox_domains``.** Postfix must know which domains it is the final destination
  for, to route them to ``virtual_transport`` and to let ``reject_unauth_destination`` pass them.
  ``static:all`` would turn every domain into a local one (an open relay for policyd to catch,
  and outgoing mail delivered locally), so it is out. With PostgreSQL or MySQL the default is a
  live ``proxy:pgsql:``/``proxy:mysql:`` lookup on the ``domains`` table (the classic
  ISPmail shape: a domain added on any host works everywhere at once; needs the
  ``postfix-pgsql``/``postfix-mysql`` package and a read-only role). With SQLite the default
  is the list of domains at generation time: Postfix's SQLite reader cannot share a WAL
  database without write access to its directory, and a stale list fails safe (mail for a new
  domain is refused, never relayed); ``mailplugins doctor`` reports domains missing from it.
- **SASL only on submission.** If authd is down, smtpd processes that need SASL die; port 25
  never needs it. Submission requires TLS (``smtpd_tls_security_level = encrypt``) and SASL.
- **Postfix keeps its own relay check** (``reject_unauth_destination``) before the policy
  service, so a policyd misconfiguration can never open a relay; policyd then validates
  recipients and sender logins with ``default_action=DEFER_IF_PERMIT`` (fail closed, but
  temporarily: mail is retried rather than lost while policyd is down).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy.engine import make_url

from mailplugins import master_passdb
from mailplugins.config import Config
from mailplugins.maildir_path import dovecot24_template, split_home
from mailplugins.releases import dovecot_release, postfix_release

__all__ = [
    "DEBIAN_CERT",
    "DEBIAN_KEY",
    "SHIPPED_SOCKETS",
    "DovecotOptions",
    "DovecotSnippet",
    "Endpoint",
    "GeneratedFile",
    "PostfixOptions",
    "PostfixSnippet",
    "Service",
    "Setting",
    "dovecot_conf_text",
    "dovecot_config",
    "parse_endpoint",
    "postfix_config",
    "render_dovecot",
    "render_postfix",
]

#: ``FileDescriptorName`` -> where the shipped socket unit (systemd/) listens, so a
#: ``systemd:domain=UNIX:name=NAME`` listener can still be named in Postfix and Dovecot.
SHIPPED_SOCKETS: Mapping[str, str] = {
    "policy": "unix:/var/spool/postfix/private/mailplugins-policy",
    "sasl": "unix:/var/spool/postfix/private/mailplugins-auth",
    "dict": "unix:/run/mailplugins/dict.sock",
    "http": "tcp:9643:interface=127.0.0.1",
    "lmtp": "unix:/var/spool/postfix/private/mailplugins-deliver",
    "milter": "unix:/var/spool/postfix/private/mailplugins-milter",
}

DEBIAN_CERT = "/etc/ssl/certs/ssl-cert-snakeoil.pem"
DEBIAN_KEY = "/etc/ssl/private/ssl-cert-snakeoil.key"
#: How long Postfix waits for policyd per request (its default, 100 s, stalls mail for 201 s).
POLICY_TIMEOUT = "10s"
POSTFIX_DEFAULT_MESSAGE_SIZE_LIMIT = 10240000


# -- endpoints ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where a client reaches a listener: a unix socket path, or a loopback TCP address."""

    kind: str  # "unix" or "inet"
    path: str = ""
    host: str = ""
    port: int = 0
    #: Why the address is a guess (systemd sockets, wildcard listeners), for a comment.
    note: str = ""

    def inet(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _split_unescaped(text: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_endpoint(description: str) -> Endpoint:
    """The client side of a Twisted server endpoint string (``unix:``, ``tcp:``, ``systemd:``).

    Raises ValueError for endpoint types a Postfix or Dovecot client cannot reach.
    """
    kind, *rest = _split_unescaped(description)
    positional = [part for part in rest if "=" not in part]
    options = dict(part.split("=", 1) for part in rest if "=" in part)
    kind = kind.lower()
    if kind == "unix":
        path = options.get("address") or (positional[0] if positional else "")
        if not path:
            raise ValueError(f"{description}: no socket path")
        return Endpoint("unix", path=os.path.normpath(path))
    if kind in ("tcp", "tcp6"):
        port_text = options.get("port") or (positional[0] if positional else "")
        if not port_text.isdigit():
            raise ValueError(f"{description}: no port")
        interface = options.get("interface", "")
        note = ""
        if interface in ("", "0.0.0.0", "::"):  # noqa: S104 - recognising a wildcard, not binding one
            note = "listens on every interface; clients use loopback"
            interface = "::1" if kind == "tcp6" or interface == "::" else "127.0.0.1"
        return Endpoint("inet", host=interface, port=int(port_text), note=note)
    if kind == "systemd":
        name = options.get("name")
        shipped = SHIPPED_SOCKETS.get(name or "")
        if shipped is None:
            raise ValueError(
                f"{description}: a systemd socket other than the shipped ones "
                f"({', '.join(f'name={n}' for n in SHIPPED_SOCKETS)}): cannot tell where it listens"
            )
        found = parse_endpoint(shipped)
        return Endpoint(found.kind, found.path, found.host, found.port,
                        note=f"socket of the shipped systemd unit ({description})")
    raise ValueError(f"{description}: Postfix and Dovecot cannot connect to a {kind!r} endpoint")


def _first(endpoints: Sequence[str], key: str) -> Endpoint:
    if not endpoints:
        raise ValueError(f"{key} is not set")
    # The first listener that a client can reach; the others (e.g. a second host's) are extras.
    errors = []
    for text in endpoints:
        try:
            return parse_endpoint(text)
        except ValueError as exc:
            errors.append(str(exc))
    raise ValueError(f"{key}: {errors[0]}")


# -- shared pieces -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One ``name = value`` line, how the doctor compares it, and why it is there."""

    name: str
    value: str
    comment: str = ""
    #: ``exact``: same value; ``contains``: the value must contain ``value`` (a restriction in
    #: a list); ``nonempty``: operator-specific (certificate paths); ``milter``: the milter list
    #: holds this endpoint with this ``default_action``; ``none``: not checked.
    check: str = "exact"


@dataclass(frozen=True)
class GeneratedFile:
    """A file the snippet refers to (map query, dict config, Lua script)."""

    path: str
    text: str
    mode: int = 0o644
    comment: str = ""
    #: Group that must read it (``postfix`` for proxymap, ``dovecot`` for the auth process).
    group: str = ""


def _queue_relative(path: str, queue_directory: str) -> str | None:
    queue = os.path.normpath(queue_directory)
    if path.startswith(queue + "/"):
        return path[len(queue) + 1:]
    return None


# -- Postfix ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostfixOptions:
    queue_directory: str = "/var/spool/postfix"
    config_directory: str = "/etc/postfix"
    #: master.cf service name of the submission listener: ``submission`` (587) or ``ADDR:PORT``.
    submission: str = "submission"
    #: Run the submission smtpd chrooted (Debian's default for smtpd).
    chroot: bool = True
    tls_cert: str = DEBIAN_CERT
    tls_key: str = DEBIAN_KEY
    #: ``auto``, ``list`` (the names in ``domain_names``) or ``sql`` (a live map).
    domains: str = "auto"
    domain_names: tuple[str, ...] = ()
    policy_timeout: str = POLICY_TIMEOUT
    #: Postfix major.minor the settings are for (3.7 on Debian 12, 3.10 on Debian 13).
    version: str = "3.7"


@dataclass(frozen=True)
class Service:
    """One master.cf service with its ``-o`` overrides."""

    name: str
    type: str
    private: str
    unpriv: str
    chroot: str
    wakeup: str
    maxproc: str
    command: str
    overrides: tuple[tuple[str, str], ...]

    def lines(self) -> list[str]:
        head = (f"{self.name:<10} {self.type:<5} {self.private:<7} {self.unpriv:<7} "
                f"{self.chroot:<7} {self.wakeup:<7} {self.maxproc:<7} {self.command}")
        return [head] + [f"  -o {name}={value}" for name, value in self.overrides]


@dataclass(frozen=True)
class PostfixSnippet:
    source: str
    main: tuple[Setting, ...]
    services: tuple[Service, ...]
    files: tuple[GeneratedFile, ...] = ()
    warnings: tuple[str, ...] = ()
    #: How virtual_mailbox_domains is served: ``list`` or ``sql``.
    domains_mode: str = "list"
    version: str = "3.7"

    def main_dict(self) -> dict[str, str]:
        return {setting.name: setting.value for setting in self.main}

    def master_lines(self) -> list[str]:
        return [line for service in self.services for line in service.lines()]


def postfix_endpoint(endpoint: Endpoint, options: PostfixOptions, what: str,
                     warnings: list[str], prefix_unix: bool = True) -> str:
    """``unix:private/NAME``, ``unix:/abs/path`` or ``inet:HOST:PORT`` as Postfix wants it."""
    if endpoint.kind == "inet":
        return f"inet:{endpoint.inet()}"
    relative = _queue_relative(endpoint.path, options.queue_directory)
    if relative is None:
        warnings.append(
            f"{what}: {endpoint.path} is outside Postfix's queue directory "
            f"{options.queue_directory}: a chrooted smtpd/lmtp cannot reach it (set chroot = n "
            f"in master.cf, or listen under {options.queue_directory}/private/)"
        )
        relative = endpoint.path
    return f"unix:{relative}" if prefix_unix else relative


def _sql_domains_file(config: Config, options: PostfixOptions) -> tuple[str, GeneratedFile]:
    url = make_url(config.database.url)
    backend = url.get_backend_name()
    driver = {"postgresql": "pgsql", "mysql": "mysql", "mariadb": "mysql"}.get(backend)
    if driver is None:
        raise ValueError(
            "virtual_mailbox_domains from SQL needs PostgreSQL or MySQL: Postfix's SQLite reader "
            "cannot share a WAL database (use --domains list)"
        )
    host = url.host or "localhost"
    if url.port:
        host = f"{host}:{url.port}"
    lines = [
        f"# Postfix {driver}_table(5) lookup: is this domain served here?",
        "# Generated by `mailplugins postfix-config`. Keep it mode 0640 root:postfix; better, use",
        "# a role that may only SELECT from the domains table.",
        f"hosts = {host}",
        f"user = {url.username or ''}",
        f"password = {url.password or ''}",
        f"dbname = {url.database or ''}",
        "query = SELECT name FROM domains WHERE name = '%s'",
    ]
    path = os.path.join(options.config_directory, f"mailplugins-domains-{driver}.cf")
    comment = f"needs the postfix-{driver} package (proxy: shares one connection per host)"
    return f"proxy:{driver}:{path}", GeneratedFile(path, "\n".join(lines) + "\n", 0o640, comment,
                                                  group="postfix")


def _policy_spec(endpoint: str, options: PostfixOptions, context: str,
                 default_action: str = "DEFER_IF_PERMIT") -> str:
    return (f"check_policy_service {{ {endpoint}, timeout={options.policy_timeout}, "
            f"default_action={default_action}, policy_context={context} }}")


def postfix_config(config: Config, options: PostfixOptions | None = None) -> PostfixSnippet:
    """main.cf settings and master.cf services for ``config``; ValueError if it cannot be wired."""
    options = options or PostfixOptions()
    postfix_release(options.version)
    warnings: list[str] = []
    main: list[Setting] = []

    # Domains and delivery.
    mode = options.domains
    if mode == "auto":
        mode = "list" if config.database.is_sqlite else "sql"
    if mode not in ("list", "sql"):
        raise ValueError(f"unknown domains mode {options.domains!r} (auto, list or sql)")
    files: list[GeneratedFile] = []
    if mode == "sql":
        lookup, query_file = _sql_domains_file(config, options)
        files.append(query_file)
        main.append(Setting(
            "virtual_mailbox_domains", lookup,
            "final-destination domains, read live from the mailplugins database",
        ))
    else:
        if not options.domain_names:
            warnings.append("the database has no domains yet: virtual_mailbox_domains is empty")
        main.append(Setting(
            "virtual_mailbox_domains", ", ".join(sorted(options.domain_names)),
            "domains in the database when this was generated: re-run after 'mailplugins domain "
            "add/remove' (mailplugins doctor reports missing ones)",
        ))
    main.append(Setting("virtual_mailbox_maps", "",
                        "empty: policyd validates recipients at RCPT time"))
    main.append(Setting("virtual_alias_maps", "",
                        "empty: aliases live in the mailplugins database (resolved by policyd and deliver)",
                        check="none"))
    if config.deliver is not None:
        lmtp = _first(config.deliver.listen, "deliver.listen")
        transport = "lmtp:" + postfix_endpoint(lmtp, options, "deliver.listen", warnings)
        main.append(Setting("virtual_transport", transport, "deliver writes the Maildirs"))
        main.append(Setting("lmtp_send_xforward_command", "yes",
                            "the queue ID lets deliver recognise a retry after a lost reply"))
        if config.deliver.max_message_size < POSTFIX_DEFAULT_MESSAGE_SIZE_LIMIT:
            main.append(Setting("message_size_limit", str(config.deliver.max_message_size),
                                "deliver.max_message_size is below Postfix's default"))
    else:
        main.append(Setting("virtual_transport", "lmtp:unix:private/dovecot-lmtp",
                            "deliver is not configured: Dovecot's LMTP delivers"))
    main.append(Setting("recipient_delimiter", config.mail.recipient_delimiter,
                        "same as mail.recipient_delimiter"))

    # TLS.
    main += [
        Setting("smtpd_tls_cert_file", options.tls_cert, check="nonempty"),
        Setting("smtpd_tls_key_file", options.tls_key, check="nonempty"),
        Setting("smtpd_tls_security_level", "may", "port 25: STARTTLS offered, not required"),
        Setting("smtpd_tls_auth_only", "yes", "never accept a password over plaintext"),
        Setting("smtpd_tls_protocols", ">=TLSv1.2", check="none"),
        Setting("smtpd_tls_mandatory_protocols", ">=TLSv1.2", check="none"),
        Setting("smtp_tls_security_level", "may", "opportunistic TLS to other servers", check="none"),
    ]

    # SASL through authd (or Dovecot's own auth socket).
    if config.authd is not None and config.authd.sasl_listen:
        sasl = _first(config.authd.sasl_listen, "authd.sasl_listen")
        if sasl.kind == "inet":
            sasl_path = f"inet:{sasl.inet()}"
        else:
            sasl_path = postfix_endpoint(sasl, options, "authd.sasl_listen", warnings, prefix_unix=False)
        sasl_comment = "authd answers Postfix's Dovecot-protocol SASL requests"
    else:
        sasl_path = "private/auth"
        sasl_comment = "authd has no sasl_listen: Dovecot's auth socket (see dovecot-config)"
    main += [
        Setting("smtpd_sasl_type", "dovecot"),
        Setting("smtpd_sasl_path", sasl_path, sasl_comment),
        Setting("smtpd_sasl_auth_enable", "no", "SASL only on submission (see master.cf)"),
    ]

    # Restrictions: Postfix's relay check first, then policyd.
    main.append(Setting(
        "smtpd_relay_restrictions",
        "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination",
        "Postfix's own relay check stays, whatever policyd answers",
        check="contains",
    ))
    overrides: list[tuple[str, str]] = [
        ("syslog_name", "postfix/submission"),
        ("smtpd_tls_security_level", "encrypt"),
        ("smtpd_sasl_auth_enable", "yes"),
        ("smtpd_tls_auth_only", "yes"),
        ("smtpd_client_restrictions", "permit_sasl_authenticated,reject"),
        ("smtpd_relay_restrictions", "permit_sasl_authenticated,reject"),
    ]
    if config.policyd is not None:
        policy = postfix_endpoint(_first(config.policyd.listen, "policyd.listen"), options,
                                  "policyd.listen", warnings)
        networks = [
            f"[{net.network_address}]/{net.prefixlen}" if net.version == 6 else str(net)
            for net in config.policyd.mynetworks
        ]
        main.append(Setting(
            "mynetworks", " ".join(networks),
            "policyd.mynetworks: Postfix's permit_mynetworks and policyd's relay control must "
            "trust the same clients",
        ))
        main.append(Setting(
            "smtpd_recipient_restrictions", _policy_spec(policy, options, "smtp"),
            "policyd: recipients, sender logins, spoofing (policy_context=smtp)",
            check="contains",
        ))
        main.append(Setting(
            "mailplugins_submission_recipient_restrictions", _policy_spec(policy, options, "submission"),
            "used by the submission service in master.cf (policy_context=submission)",
        ))
        overrides.append(("smtpd_recipient_restrictions", "$mailplugins_submission_recipient_restrictions"))
        stages = []
        if any(getattr(config.policyd, name, None) is not None for name in ("ratelimit", "greylist", "spf")):
            # Rate limits count messages at DATA; the second of the Received-SPF / X-Greylist
            # headers goes out on the DATA reply (one PREPEND per reply).
            stages.append("data")
        if getattr(config.policyd, "ratelimit", None) is not None:
            stages.append("end_of_data")  # byte limits
        if stages:
            # These fail open (DUNNO): the RCPT check above already fails closed when policyd
            # is unreachable.
            for stage in stages:
                for context, name in (("smtp", f"smtpd_{stage}_restrictions"),
                                      ("submission", f"mailplugins_submission_{stage}_restrictions")):
                    main.append(Setting(
                        name, _policy_spec(policy, options, context, "DUNNO"),
                        f"policyd rate limits and headers (policy_context={context})", check="contains",
                    ))
                overrides.append((f"smtpd_{stage}_restrictions",
                                  f"$mailplugins_submission_{stage}_restrictions"))
    else:
        warnings.append("policyd is not configured: Postfix does no recipient validation")
    milter_main, milter_overrides = _milter_settings(config, options, warnings)
    main += milter_main
    overrides += milter_overrides
    overrides.append(("milter_macro_daemon_name", "ORIGINATING"))
    submission = Service(
        options.submission, "inet", "n", "-", "y" if options.chroot else "n", "-", "-", "smtpd",
        tuple(overrides),
    )
    for endpoint_text in _daemon_endpoints(config):
        try:
            endpoint = parse_endpoint(endpoint_text)
        except ValueError:
            continue  # an extra listener nobody here connects to (e.g. a second host's)
        if endpoint.note and "every interface" in endpoint.note:
            warnings.append(f"{endpoint_text}: {endpoint.note}; bind it to 127.0.0.1 instead")
    return PostfixSnippet(
        source=config.source,
        main=tuple(main),
        services=(submission,),
        files=tuple(files),
        warnings=tuple(dict.fromkeys(warnings)),
        domains_mode=mode,
        version=options.version,
    )


#: How long Postfix waits for milterd per command and per message content step; milterd answers
#: within ``milterd.budget`` (20 s by default) or gives the direction's safe answer itself.
MILTER_COMMAND_TIMEOUT = "30s"
MILTER_CONTENT_TIMEOUT = "60s"


def _milter_spec(endpoint: str, default_action: str) -> str:
    return (f"{{ {endpoint}, connect_timeout=10s, command_timeout={MILTER_COMMAND_TIMEOUT}, "
            f"content_timeout={MILTER_CONTENT_TIMEOUT}, default_action={default_action} }}")


def _milter_settings(
    config: Config, options: PostfixOptions, warnings: list[str]
) -> tuple[list[Setting], list[tuple[str, str]]]:
    """milterd for port 25 (incoming: checked), submission and sendmail (outgoing: signed).

    One listener, three Postfix milter lists, each with its own ``default_action`` for when
    milterd is down or too slow: port 25 ``accept`` (mail is never lost for want of a check),
    submission and ``non_smtpd_milters`` ``tempfail`` (mail waits in the client or the queue
    rather than leaving unsigned). The submission service takes its list from
    ``mailplugins_submission_milters`` (no spaces inside a master.cf ``-o``).
    """
    milterd = getattr(config, "milterd", None)
    if milterd is None:
        return [], []
    endpoint = postfix_endpoint(_first(milterd.listen, "milterd.listen"), options,
                                "milterd.listen", warnings)
    main = [
        Setting("milter_protocol", "6", "milterd speaks milter protocol 6"),
        Setting("smtpd_milters", _milter_spec(endpoint, "accept"),
                "milterd checks incoming mail (DKIM, SPF, DMARC); if it is down, mail is accepted "
                "unchecked rather than lost", check="milter"),
        Setting("non_smtpd_milters", _milter_spec(endpoint, "tempfail"),
                "milterd signs mail from sendmail; if it is down, the mail waits in the queue",
                check="milter"),
        Setting("mailplugins_submission_milters", _milter_spec(endpoint, "tempfail"),
                "used by the submission service: signing; if milterd is down, the client retries "
                "rather than the mail leaving unsigned", check="milter"),
    ]
    return main, [("smtpd_milters", "$mailplugins_submission_milters")]


def _daemon_endpoints(config: Config) -> Iterable[str]:
    if config.policyd is not None:
        yield from config.policyd.listen
    if config.authd is not None:
        yield from config.authd.sasl_listen
        yield from config.authd.dict_listen
        yield from config.authd.http_listen
    if config.deliver is not None:
        yield from config.deliver.listen
    milterd = getattr(config, "milterd", None)
    if milterd is not None:
        yield from milterd.listen


def _header(tool: str, source: str) -> list[str]:
    return [
        f"# Generated by `mailplugins {tool}` from {source}.",
        "# Review, then merge; `mailplugins doctor` compares the live configuration with this.",
    ]


def render_postfix(snippet: PostfixSnippet) -> str:
    out = _header("postfix-config", snippet.source)
    out.append(f"# For Postfix {snippet.version} (postfix-config --postfix-version picks another).")
    out += [f"# WARNING: {text}" for text in snippet.warnings]
    out += ["", "# ---- main.cf (or: postconf -e 'name = value' for each line) ----"]
    for setting in snippet.main:
        if setting.comment:
            out.append(f"# {setting.comment}")
        out.append(f"{setting.name} = {setting.value}".rstrip())
    out += ["", "# ---- master.cf (append; port 25's smtpd entry stays as it is) ----"]
    out += snippet.master_lines()
    for generated in snippet.files:
        out += ["", f"# ---- {generated.path} (mode {generated.mode:04o}; {generated.comment}) ----"]
        for line in generated.text.rstrip("\n").splitlines():
            # Never print the database password: --write puts the real one in the file.
            if line.startswith("password = ") and line != "password = ":
                line = "password = ********  (postfix-config --write writes the real one)"
            out.append(line)
    return "\n".join(out) + "\n"


# -- Dovecot -----------------------------------------------------------------------------------------


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
    endpoint = _first(config.authd.dict_listen, "authd.dict_listen")
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
    endpoint = _first(config.authd.http_listen, "authd.http_listen")
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
        endpoint = _first(config.authd.dict_listen, "authd.dict_listen")
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
    # Master users: a master passdb before the ordinary one (mailplugins/master_passdb.py).
    if options.lua:
        passdbs.insert(0, master_passdb.master_of(passdbs[0], "2.3"))
    else:
        socket_path = _first(config.authd.dict_listen, "authd.dict_listen").path
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
        socket_path = _first(config.authd.dict_listen, "authd.dict_listen").path
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
    out = _header("dovecot-config", snippet.source)
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
