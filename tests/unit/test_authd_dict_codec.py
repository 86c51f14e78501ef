"""authd.dict_codec: the dict proxy protocol as Dovecot 2.3's dict client speaks it."""

from __future__ import annotations

import pytest

from authd import dict_codec as codec
from authd.sasl_codec import ProtocolError

HELLO = b"H3\t2\t0\t\tauth\n"
SESSION = (
    HELLO
    + b"Lshared/passdb/alice@example.org\talice@example.org\n"
    + b"I0\t0\tshared/userdb/\t*\n"
    + b"B1\talice@example.org\n"
    + b"S1\tshared/last-login/alice@example.org\t1763777777\n"
    + b"C1\n"
    + b"R2\n"
)
EXPECTED = [
    codec.Hello(3, 2, "", "auth"),
    codec.Lookup("shared/passdb/alice@example.org", "alice@example.org"),
    codec.Iterate(0, 0, "shared/userdb/", "*"),
    codec.Begin(1, "alice@example.org"),
    codec.Change(1, "S", "shared/last-login/alice@example.org", "1763777777"),
    codec.Commit(1, False),
    codec.Rollback(2),
]


def test_session_decodes() -> None:
    assert codec.DictDecoder().feed(SESSION) == EXPECTED


def test_every_split_point() -> None:
    for cut in range(1, len(SESSION)):
        decoder = codec.DictDecoder()
        assert decoder.feed(SESSION[:cut]) + decoder.feed(SESSION[cut:]) == EXPECTED, cut
    decoder = codec.DictDecoder()
    assert [c for i in range(len(SESSION)) for c in decoder.feed(SESSION[i : i + 1])] == EXPECTED


def test_old_protocol_forms() -> None:
    decoder = codec.DictDecoder()
    assert decoder.feed(b"H2\t1\t0\t\tauth\nLshared/userdb/a@b\nI1\tshared/userdb/\n") == [
        codec.Hello(2, 1, "", "auth"),
        codec.Lookup("shared/userdb/a@b", ""),
        codec.Iterate(1, 0, "shared/userdb/", ""),
    ]


def test_empty_user_from_doveadm() -> None:
    decoder = codec.DictDecoder()
    assert decoder.feed(HELLO + b"Lshared/passdb/a@b\t\n")[1] == codec.Lookup("shared/passdb/a@b", "")


def test_escaped_key_is_unescaped() -> None:
    decoder = codec.DictDecoder()
    assert decoder.feed(HELLO + b"Lshared/passdb/a\x01tb@c\tu\n")[1] == codec.Lookup(
        "shared/passdb/a\tb@c", "u"
    )


@pytest.mark.parametrize(
    "data",
    [
        b"Lshared/passdb/a@b\n",  # before hello
        b"H9\t0\n",  # unknown major
        b"Hx\t0\n",
        HELLO + b"\n",
        HELLO + b"Zfoo\n",
        HELLO + b"Bx\n",
        HELLO + b"I0\n",
        HELLO + b"S1\n",
        HELLO + b"\xff\n",
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        codec.DictDecoder().feed(data)


def test_line_limit() -> None:
    decoder = codec.DictDecoder(max_line=4096)
    decoder.feed(HELLO)
    with pytest.raises(ProtocolError, match="too long"):
        decoder.feed(b"L" + b"a" * 5000)


def test_replies() -> None:
    assert codec.found('{"a": 1}') == b'O{"a": 1}\n'
    assert codec.found("a\tb") == b"Oa\x01tb\n"
    assert codec.NOT_FOUND == b"N\n"
    assert codec.failed("db down") == b"Fdb down\n"
    assert codec.iterate_rows([("shared/userdb/a@b", "{}"), ("shared/userdb/c@d", "")]) == (
        b"Oshared/userdb/a@b\t{}\nOshared/userdb/c@d\t\n\n"
    )
    assert codec.iterate_rows([]) == b"\n"
    assert codec.commit_reply(4, True) == b"O4\n"
    assert codec.commit_reply(4, False, "x") == b"F4\tx\n"
