# -*- test-case-name: tests.unit.test_wiring_postfix -*-
"""The Postfix settings that wire stock Postfix to the daemons as configured.

Pure functions of a :class:`~mailplugins.config.Config` plus a few operator choices (TLS files,
where Postfix's queue lives, which domains exist): ``mailplugins postfix-config`` renders them,
``mailplugins doctor`` compares them with the live ``postconf`` output, and the end-to-end tests
feed them to private stock servers (:mod:`mailplugins.wiring.dovecot` does the same for Dovecot).
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
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy.engine import make_url

from mailplugins.config import Config
from mailplugins.releases import postfix_release
from mailplugins.wiring.endpoints import Endpoint, first_endpoint, parse_endpoint
from mailplugins.wiring.snippets import DEBIAN_CERT, DEBIAN_KEY, GeneratedFile, Setting, file_header

__all__ = [
    "POLICY_TIMEOUT",
    "PostfixOptions",
    "PostfixSnippet",
    "Service",
    "postfix_config",
    "postfix_endpoint",
    "render_postfix",
]

#: How long Postfix waits for policyd per request (its default, 100 s, stalls mail for 201 s).
POLICY_TIMEOUT = "10s"
POSTFIX_DEFAULT_MESSAGE_SIZE_LIMIT = 10240000


def _queue_relative(path: str, queue_directory: str) -> str | None:
    queue = os.path.normpath(queue_directory)
    if path.startswith(queue + "/"):
        return path[len(queue) + 1:]
    return None


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
        lmtp = first_endpoint(config.deliver.listen, "deliver.listen")
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
        sasl = first_endpoint(config.authd.sasl_listen, "authd.sasl_listen")
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
        policy = postfix_endpoint(first_endpoint(config.policyd.listen, "policyd.listen"), options,
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
    endpoint = postfix_endpoint(first_endpoint(milterd.listen, "milterd.listen"), options,
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


def render_postfix(snippet: PostfixSnippet) -> str:
    out = file_header("postfix-config", snippet.source)
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
