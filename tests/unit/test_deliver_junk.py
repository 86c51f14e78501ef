"""deliver files milterd's DMARC quarantine verdicts into Junk, and trusts no other verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deliver.junk import authserv_id_of, quarantined, top_fields
from deliver.store_one import is_junk
from tests.unit.test_deliver_service import deliver, maildir
from tests.unit.test_deliver_service import make as make  # the fixture

OURS = ("Authentication-Results: mx.example.test; dkim=none; spf=fail smtp.mailfrom=x.example;\r\n"
        "\tdmarc=fail (p=quarantine dis=quarantine) header.from=bank.example\r\n")
RECEIVED = "Received: from client (client [198.51.100.9]) by mx.example.test (Postfix)\r\n"


def message(*fields: str) -> bytes:
    return ("".join(fields) + "Subject: hi\r\n\r\nbody\r\n").encode()


@pytest.mark.parametrize(("data", "junk"), [
    (message(OURS, RECEIVED), True),
    (message(OURS.replace("dis=quarantine", "dis=none"), RECEIVED), False),
    (message(OURS.replace("mx.example.test", "other.example"), RECEIVED), False),
    # A forged verdict below Postfix's Received: (milterd did not run) is never believed.
    (message(RECEIVED, OURS), False),
    (message("Authentication-Results: other.example; dmarc=pass\r\n", OURS, RECEIVED), True),
    (message(OURS.replace("dmarc=fail (p=quarantine dis=quarantine)", "dkim=pass (dis=quarantine)")),
     False),
    (message(OURS.replace("mx.example.test;", "MX.Example.Test (comment);")), True),
    (b"", False),
    # The first field's name in any case, or a stray continuation line above it.
    (message(OURS.replace("Authentication-Results:", "AUTHENTICATION-RESULTS :")), True),
    (b" stray\r\n" + message(OURS), True),
    (message("X-Authentication-Results: mx.example.test; dmarc=fail (dis=quarantine)\r\n"), False),
])
def test_quarantined(data: bytes, junk: bool) -> None:
    assert quarantined(data, "mx.example.test") is junk


def test_parsing_helpers() -> None:
    assert top_fields(b"A: 1\n folded\nB:2\n\nC: 3\n") == [("A", "1 folded"), ("B", "2")]
    assert authserv_id_of(" (c) mx.example.test ; dkim=pass") == "mx.example.test"


def test_quarantined_mail_goes_to_junk(make: Any, tmp_path: Path) -> None:
    service, _ = make(authserv_id="mx.example.test")
    deliver(service, ["alice@example.org", "bob+Lists@example.org"], message(OURS, RECEIVED))
    for user in ("alice", "bob"):
        junk = maildir(tmp_path, user) / ".Junk" / "new"
        assert len(list(junk.iterdir())) == 1, user
        assert not list((maildir(tmp_path, user) / "new").iterdir())
    assert service.metrics.junk._value.get() == 1


def test_junk_can_be_switched_off(make: Any, tmp_path: Path) -> None:
    service, _ = make(authserv_id="mx.example.test", junk_folder="")
    deliver(service, ["alice@example.org"], message(OURS, RECEIVED))
    assert len(list((maildir(tmp_path, "alice") / "new").iterdir())) == 1


def test_a_spooled_message_is_read_from_its_file(make: Any, tmp_path: Path) -> None:
    from deliver.maildir import Body

    service, _ = make(authserv_id="mx.example.test")
    data = message(OURS, RECEIVED) + b"x" * 300_000
    spool = (tmp_path / "spool").open("w+b")
    spool.write(b"HEAD" + data)
    body = Body(len(data), 0, spool=spool, offset=4)
    assert is_junk(service.current, body)
    body.close()
