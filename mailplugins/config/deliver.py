# -*- test-case-name: tests.unit.test_deliver_config -*-
"""The ``deliver:`` section: the LMTP listener and how it writes Maildir.

Defaults follow what an operator of Postfix and Dovecot expects: a 50 MiB size limit (above
Postfix's 10 MB ``message_size_limit``, so Postfix is the one that refuses big mail), the
classic default folders, ``+detail`` saved into an existing folder, permanent quota failures
(Dovecot's default, ``quota_full_tempfail = no``) and stale ``tmp/`` files removed after 36 h
as the Maildir spec says.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from mailplugins.addresses import AddressError, parse_address
from mailplugins.config.fields import Fields, describe

#: What to answer for a recipient whose mailbox is disabled.
DISABLED_ACTIONS = ("reject", "defer")
#: When to write ``Delivered-To``: always, only when the transaction has one recipient
#: (Dovecot's behaviour, so one file can be hardlinked to every recipient), or never.
DELIVERED_TO_MODES = ("always", "single", "never")


@dataclass(frozen=True)
class DeliverConfig:
    listen: tuple[str, ...]
    metrics: str | None
    max_connections: int
    #: Largest message accepted (octets, LF line ends); advertised as ``SIZE``.
    max_message_size: int
    #: Host part of Maildir file names and of the greeting.
    hostname: str
    #: Where DATA is spooled while it streams; None = ``.mailplugins-spool`` in the mail root,
    #: so the spool is on the Maildir filesystem.
    spool_directory: str | None
    #: Folders created with a new Maildir (Maildir++ ``.Name``).
    default_folders: tuple[str, ...]
    #: ``user+detail`` goes to folder ``detail`` when it exists (else INBOX).
    detail_folders: bool
    #: Create the ``+detail`` folder when it does not exist yet.
    autocreate_detail_folders: bool
    #: Over quota: ``452 4.2.2`` (Postfix retries) instead of ``552 5.2.2`` (bounce).
    quota_tempfail: bool
    #: Close a connection idle this long (Postfix caches idle connections for 2 s). Also the
    #: time a client has to finish each command line: stray bytes do not extend it.
    idle_timeout: float
    #: In DATA, input extends the timeout only while it averages at least this many bytes/s
    #: (Postfix's smtpd_min_data_rate), so a trickle times out; 0: any byte extends it.
    min_data_rate: int
    #: Longest command line (without CRLF); DATA lines are not limited (they stream).
    max_line_length: int
    #: Answer for a disabled mailbox: ``reject`` (550 5.2.1) or ``defer`` (450 4.2.1).
    disabled: str
    delivered_to: str
    #: Files in a Maildir's ``tmp/`` older than this are removed (spec: 36 h).
    stale_tmp_age: float
    #: Check a Maildir's ``tmp/`` for stale files at most this often (on delivery).
    stale_tmp_interval: float
    #: Threads writing and fsyncing Maildir files.
    disk_threads: int
    #: DATA held in memory before it goes to the spool file (per connection).
    memory_spool_limit: int
    #: Seconds a found recipient (mailboxes, folders, quota) is remembered; 0 disables.
    lookup_cache_ttl: float
    #: Advertise DSN so Postfix sends ORCPT (-> X-Original-To); needs Postfix's
    #: ``lmtp_assume_final = yes`` so Postfix itself sends "delivered" notifications.
    advertise_dsn: bool
    #: Where ``RCPT TO:<postmaster>`` (RFC 5321 4.5.1) goes; None: postmaster@ the first
    #: local domain (alphabetically), looked up at RCPT time.
    postmaster: str | None
    #: Add Dovecot's ``Received:`` trace line (Dovecot: ``lmtp_add_received_header``).
    received_header: bool
    #: Folder for mail milterd marked ``dis=quarantine`` (DMARC); "" files it into INBOX.
    junk_folder: str = "Junk"
    #: Whose Authentication-Results to trust for that; None: ``milterd.authserv_id`` when
    #: milterd is configured in the same file, else this host's FQDN (milterd's default).
    authserv_id: str | None = None
    #: Processes serving deliver (mailplugins.workers); 1 = today's single process.
    workers: int = 1


def _hostname(value: object) -> str:
    if not isinstance(value, str) or not value or len(value) > 255:
        raise ValueError(f"expected a host name, got {describe(value)}")
    if any(ord(c) < 33 or ord(c) == 127 for c in value):
        raise ValueError(f"host name must not contain spaces or control characters: {describe(value)}")
    return value


def _folder(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a folder name, got {describe(value)}")
    if value.upper() == "INBOX" or value.startswith(".") or "/" in value or ".." in value:
        raise ValueError(f"not a valid folder name: {describe(value)}")
    if value.endswith(".") or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"not a valid folder name: {describe(value)}")
    return value


def _mail_address(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a mail address, got {describe(value)}")
    try:
        address = parse_address(value)
    except AddressError as exc:
        raise ValueError(f"not a mail address ({exc}): {describe(value)}") from None
    if address.routing:
        raise ValueError(f"not a plain mail address: {describe(value)}")
    return str(address)


def parse_deliver(f: Fields) -> DeliverConfig:
    config = DeliverConfig(
        listen=f.endpoints("listen"),
        metrics=f.endpoint("metrics", None),
        max_connections=f.integer("max_connections", 1000, minimum=1),
        workers=f.workers(),
        max_message_size=f.size("max_message_size", 50 * 1024 * 1024, minimum=1024),
        hostname=f.convert("hostname", socket.gethostname(), _hostname),
        spool_directory=f.path("spool_directory", None) or None,
        default_folders=f.items(
            "default_folders", ("Drafts", "Sent", "Trash", "Templates"), _folder
        ),
        detail_folders=f.boolean("detail_folders", True),
        autocreate_detail_folders=f.boolean("autocreate_detail_folders", False),
        quota_tempfail=f.boolean("quota_tempfail", False),
        idle_timeout=f.duration("idle_timeout", 600.0, minimum=1, maximum=86400),
        min_data_rate=f.integer("min_data_rate", 500, minimum=0),
        max_line_length=f.integer("max_line_length", 4096, minimum=512, maximum=65536),
        disabled=f.string("disabled", "reject", choices=DISABLED_ACTIONS),
        delivered_to=f.string("delivered_to", "always", choices=DELIVERED_TO_MODES),
        stale_tmp_age=f.duration("stale_tmp_age", 36 * 3600.0, minimum=60),
        stale_tmp_interval=f.duration("stale_tmp_interval", 3600.0, minimum=1),
        disk_threads=f.integer("disk_threads", min(16, 4 * (os.cpu_count() or 2)), minimum=1,
                               maximum=256),
        memory_spool_limit=f.size("memory_spool_limit", 256 * 1024, minimum=4096),
        lookup_cache_ttl=f.duration("lookup_cache_ttl", 10.0, minimum=0, maximum=3600),
        advertise_dsn=f.boolean("advertise_dsn", False),
        postmaster=f.convert("postmaster", None, _mail_address),
        received_header=f.boolean("received_header", True),
        junk_folder=f.convert("junk_folder", "Junk", lambda v: "" if v == "" else _folder(v)),
        authserv_id=f.convert("authserv_id", None, _hostname),
    )
    f.done()
    return config
