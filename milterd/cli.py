# -*- test-case-name: tests.unit.test_dkim_cli -*-
"""``mailplugins dkim keygen|activate|retire|list`` and ``mailplugins dns-records``.

Registered through the ``mailplugins.commands`` entry point, so the core CLI never imports
milterd. The keys, their record text and the records' check live in the core
(:mod:`mailplugins.dkim_keys`, :mod:`mailplugins.dns_records`) because ``doctor --dns`` needs them
too. A private key is never printed, not even by ``keygen``: it goes from the generator into the
database, and milterd reads it from there.
"""

from __future__ import annotations

import argparse
import os
import stat
from typing import Any

from sqlalchemy.engine import make_url

from mailplugins.addresses import AddressError, parse_domain
from mailplugins.cli import (
    EXIT_USAGE,
    App,
    CommandError,
    command_group,
    nameserver_option,
    print_json,
    print_table,
)
from mailplugins.dkim_keys import (
    KEY_TYPES,
    MAX_RSA_BITS,
    MIN_RSA_BITS,
    DkimKeyRecord,
    DkimKeys,
    key_record_problem,
    signing_ids,
)
from mailplugins.dns_records import expected_records, render_zone
from mailplugins.records import StoreError


def _keys(app: App) -> DkimKeys:
    return DkimKeys(app.store.engine)


def _bits(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"bad key size {text!r}: expected a number of bits")
    if not MIN_RSA_BITS <= int(text) <= MAX_RSA_BITS:
        raise argparse.ArgumentTypeError(
            f"RSA keys of {int(text)} bits are refused: use {MIN_RSA_BITS} to {MAX_RSA_BITS} "
            "(1024-bit keys are breakable and large receivers ignore them)")
    return int(text)


def _refuse_world_readable_database(app: App) -> None:
    """SQLite: refuse to put a private key in a file every local user can read.

    The install guide's ``/var/lib/mailplugins`` is 2770, so a 0644 file inside is still private;
    only a file that is readable *and* reachable by others is refused.
    """
    if not app.config.database.is_sqlite:
        return
    path = make_url(app.config.database.url).database
    if not path or path == ":memory:":
        return
    try:
        file_mode = os.stat(path).st_mode
        dir_mode = os.stat(os.path.dirname(os.path.abspath(path))).st_mode
    except OSError:
        return  # the database call that follows reports it
    if file_mode & stat.S_IROTH and dir_mode & stat.S_IXOTH:
        raise CommandError(f"the database {path} is readable by every local user, and DKIM private "
                           f"keys would be too: chmod o-rwx {os.path.dirname(os.path.abspath(path))}")


def _refuse_non_local_domain(app: App) -> None:
    """A key for a domain the database does not know is almost always a typo (``exmaple.org``)
    whose record would be published and never used; ``--force`` is for a domain that only sends
    (its mail is signed here but received elsewhere)."""
    if app.args.force:
        return
    try:
        domain = parse_domain(app.args.domain)
    except AddressError as exc:
        raise CommandError(f"{app.args.domain}: {exc}", EXIT_USAGE) from None
    if not app.store.is_local_domain(domain):
        raise CommandError(f"{domain} is not a local domain: 'mailplugins domain add {domain}' "
                           "first, or --force for a domain that only sends mail from here",
                           EXIT_USAGE)


def _size(key: DkimKeyRecord) -> str:
    return f"rsa {key.bits}" if key.key_type == "rsa" else key.key_type


def cmd_keygen(app: App) -> None:
    a = app.args
    if a.algorithm == "ed25519" and a.bits is not None:
        raise CommandError("--bits applies to RSA keys only (Ed25519 keys are 256 bits)", EXIT_USAGE)
    _refuse_non_local_domain(app)
    _refuse_world_readable_database(app)
    key = _keys(app).generate(a.domain, selector=a.selector, key_type=a.algorithm, bits=a.bits)
    ttl = app.config.dns.ttl
    record = expected_records(key.domain, app.config.dns, [key])
    dkim = next(r for r in record if r.key is not None)
    app.out.write(f"; created pending DKIM key {key.selector} ({_size(key)}) for {key.domain}\n"
                  f"; publish this record, then: mailplugins dkim activate {key.domain} {key.selector}\n"
                  f"{dkim.zone_line(ttl)}\n")


def cmd_activate(app: App) -> None:
    from mailplugins import dns

    keys = _keys(app)
    key = keys.get(app.args.domain, app.args.selector)
    if key is None:
        raise StoreError(f"no DKIM key {app.args.selector} for {app.args.domain}")
    if key.state != "pending":
        raise StoreError(f"DKIM key {key.selector} of {key.domain} is {key.state}, not pending")
    if not app.args.no_dns_check:
        servers, timeout = app.dns_servers()
        how = f"publish what 'mailplugins dns-records {key.domain}' shows, or --no-dns-check"
        try:
            answers = dns.txt_records(key.dns_name, nameservers=servers, timeout=timeout)
        except dns.DnsTempError as exc:
            raise CommandError(f"cannot check the published key: {exc} (try again, or --no-dns-check)"
                               ) from None
        if not answers:
            raise CommandError(f"{key.dns_name} has no TXT record: {how}")
        reasons = [key_record_problem(answer, key) for answer in answers]
        if None not in reasons:
            raise CommandError(f"{key.dns_name}: the published record is not this key ({reasons[0]}): {how}")
    before = {k.id for k in keys.list_keys(key.domain) if k.state == "active" and k.key_type == key.key_type}
    keys.activate(key.domain, key.selector)
    app.out.write(f"activated {key.selector}: {key.domain}'s mail is signed with it ({key.algorithm})\n")
    for old in keys.list_keys(key.domain):
        if old.id in before:
            app.out.write(f"{old.selector} no longer signs but stays active and published: retire it "
                          f"when mail it signed has been delivered (mailplugins dkim retire "
                          f"{old.domain} {old.selector}; see docs/dkim.md)\n")


def cmd_retire(app: App) -> None:
    key = _keys(app).retire(app.args.domain, app.args.selector, force=app.args.force)
    app.out.write(f"retired {key.selector} of {key.domain} (its private key is erased); "
                  f"remove the TXT record {key.dns_name}\n")


def _key_dict(key: DkimKeyRecord, signing: bool) -> dict[str, Any]:
    return {"domain": key.domain, "selector": key.selector, "algorithm": key.algorithm,
            "key_type": key.key_type, "bits": key.bits, "state": key.state, "signing": signing,
            "dns_name": key.dns_name, "record": key.txt_value(), "created_at": key.created_at,
            "activated_at": key.activated_at, "retired_at": key.retired_at}


def cmd_list(app: App) -> None:
    keys = _keys(app).list_keys(app.args.domain)
    signing = signing_ids(keys)
    if app.args.json:
        print_json([_key_dict(k, k.id in signing) for k in keys], app.out)
        return

    def when(key: DkimKeyRecord) -> str:
        stamps = [("created", key.created_at), ("activated", key.activated_at),
                  ("retired", key.retired_at)]
        return ", ".join(f"{name} {value:%Y-%m-%d %H:%M}" for name, value in stamps if value)

    print_table([(k.domain, k.selector, _size(k), k.state + (" (signing)" if k.id in signing else ""),
                  when(k)) for k in keys], app.out)


def cmd_dns_records(app: App) -> None:
    domain = _normal_domain(app.args.domain)
    keys = _keys(app).list_keys(domain)
    records = expected_records(domain, app.config.dns, keys, sorted(signing_ids(keys)))
    ttl = app.config.dns.ttl
    if app.args.json:
        print_json([r.as_dict(ttl) for r in records], app.out)
        return
    for host in app.config.dns.mx:
        if "." not in host:
            app.out.write(f"; the MX host {host!r} is not a fully qualified name: set dns.mx\n")
    app.out.write(render_zone(records, ttl))


def _normal_domain(text: str) -> str:
    from mailplugins.addresses import AddressError, parse_domain

    try:
        return parse_domain(text)
    except AddressError as exc:
        raise CommandError(f"{text}: {exc}", EXIT_USAGE) from None


def register(commands: Any) -> None:
    """Add ``dkim`` and ``dns-records`` to ``mailplugins`` (entry point ``mailplugins.commands``)."""
    action = command_group(commands, "dkim",
                           "DKIM signing keys: generate, activate, retire, list (milterd)")
    sub = action("keygen", cmd_keygen, "create a pending key and print its DNS TXT record")
    sub.add_argument("domain")
    sub.add_argument("--selector", help="default: mp<YYYYMM> and r (rsa) or e (ed25519)")
    sub.add_argument("--algorithm", choices=KEY_TYPES, default="rsa", help="default rsa")
    sub.add_argument("--bits", type=_bits, metavar="N", help="RSA key size, 2048 (default) to 4096")
    sub.add_argument("--force", action="store_true",
                     help="even for a domain that is not a local domain in the database")
    sub = action("activate", cmd_activate,
                 "sign with a pending key from now on, once DNS serves its record")
    sub.add_argument("domain")
    sub.add_argument("selector")
    sub.add_argument("--no-dns-check", action="store_true",
                     help="activate without looking the record up (mail may fail DKIM)")
    nameserver_option(sub)
    sub = action("retire", cmd_retire, "stop signing with a key for good (its private key is erased)")
    sub.add_argument("domain")
    sub.add_argument("selector")
    sub.add_argument("--force", action="store_true",
                     help="even the domain's last active key (its mail then goes out unsigned)")
    sub = action("list", cmd_list, "list keys, their states and which ones sign")
    sub.add_argument("domain", nargs="?")
    sub.add_argument("--json", action="store_true")

    text = "print the DNS records a domain must publish (MX, SPF, DKIM, DMARC) as zone-file lines"
    sub = commands.add_parser("dns-records", help=text, description=text)
    sub.set_defaults(handler=cmd_dns_records)
    sub.add_argument("domain")
    sub.add_argument("--json", action="store_true")
