"""milterd.fromheader: the plain-form shortcut gives what email.utils.getaddresses gives."""

from __future__ import annotations

import email.utils
import random

import pytest

from milterd import fromheader

PLAIN = [
    " Sender <sender@bench.example>", "sender@bench.example", " <a@b.example>",
    "John  Doe <j.d@x.org>", " John\tDoe <j@x.org> ", "Ann <ann@EXAMPLE.com>",
    "=?utf-8?q?J=C3=B6?= <a@b.example>", " a+tag@sub.example.org", "x-y <first.last@a-b.example>",
    " folded\r\n <a@b.example>", "Name\n\t<a@b.example>",
]
OTHER = [
    '"Doe, J" <j@x.org>', "a@b.c, d@e.f", "J. Doe <j@x.org>", "x <a@b.c> y", "<a@b.c",
    "Jo (c) <a@b.c>", "a.@b.c", "A <a@-b.c>", "A <a@b.c.>", " a@b.c (Ann)", "a@b",
    "group: a@b.c, d@e.f;", "<a@[192.0.2.1]>", "A <<a@b.c>>", "a@b.c>", "", " ", "@b.c",
    "A <@b.c>", "A <a@>", "\"a b\"@c.d", "A <a@b.c> <d@e.f>", "a@b..c", "A <a@b.c-.d>",
]


def reference(value: str) -> list[tuple[str, str]]:
    return email.utils.getaddresses([value.replace("\r\n", "").replace("\n", "")])


@pytest.mark.parametrize("value", PLAIN + OTHER)
def test_agrees_with_getaddresses(value: str) -> None:
    assert fromheader.addresses(value) == reference(value)


@pytest.mark.parametrize("value", PLAIN)
def test_plain_forms_take_the_shortcut(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(values: object) -> None:
        raise AssertionError("getaddresses called for a plain From:")

    monkeypatch.setattr(email.utils, "getaddresses", refuse)
    assert fromheader.addresses(value)[0][1].count("@") == 1


def test_agrees_on_random_values() -> None:
    """Random strings over the characters that matter to either parser."""
    rng = random.Random(1)
    alphabet = 'aZ09.-_ <>@,;:"()\\[]\t+=?'
    for _ in range(3000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        if rng.random() < 0.5:
            value = rng.choice(["", "Name ", " "]) + "<" + value.strip("<>") + "@x.example>"
        assert fromheader.addresses(value) == reference(value), value
