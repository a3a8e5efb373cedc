"""`invalid_head`: the one-pass check of an upstream head agrees with the per-field rules it stands for."""

from __future__ import annotations

import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.forward import invalid_head

TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


def field_is_valid(name: bytes, value: bytes) -> bool:
    """RFC 9110, one field at a time: a token for a name; for a value, visible bytes, spaces and tabs,
    valid UTF-8."""
    if not TOKEN.fullmatch(name) or not VALUE.fullmatch(value):
        return False
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Mostly plain fields, with now and then a byte from anywhere (controls, line feeds, non-ASCII, nothing).
mostly_plain = st.binary(max_size=8) | st.text(alphabet="abcXYZ019-_ !#:;\t\xe9", max_size=8).map(
    lambda text: text.encode("utf-8")
)
heads = st.lists(st.tuples(mostly_plain, mostly_plain), min_size=1, max_size=5).map(tuple)


@given(heads)
@example(((b"X-A", b"\xc3"), (b"X-B", b"\xa9")))  # a character split across two values
@example(((b"X-A", b"caf\xf0\x9f"), (b"X-B", b"\x98\x80")))
def test_a_head_is_refused_exactly_when_one_of_its_fields_breaks_the_rules(
    raw_headers: tuple[tuple[bytes, bytes], ...],
) -> None:
    expected_valid = all(field_is_valid(name, value) for name, value in raw_headers)
    assert (invalid_head(200, "OK", raw_headers) is None) == expected_valid


def test_what_a_refusal_names() -> None:
    assert invalid_head(200, "OK", ((b"Content-Length ", b"2"),)) == "header name b'Content-Length '"
    assert invalid_head(200, "OK", ((b"X", b"a\nb"),)) == "control bytes in header X"
    assert invalid_head(200, "OK", ((b"X", b"\xff"),)) == "header X is not valid UTF-8"
    assert invalid_head(200, "OK", ((b"X-A", b"\xc3"), (b"X-B", b"\xa9"))) == "header X-A is not valid UTF-8"
    assert invalid_head(200, "OK", ((b"A", b"1"), (b"", b"2"))) == "header name b''"
    assert invalid_head(101, "OK", ()) == "status 101"
    assert invalid_head(200, "OK", ((b"Server", b"nginx"), (b"X-Name", "café".encode()))) is None


# As the parser hands a reason phrase over: UTF-8 decoded with surrogateescape.
@pytest.mark.parametrize(
    ("raw", "valid"),
    [
        (b"OK", True),
        (b"", True),
        (b"Not\tFound", True),
        ("Café".encode(), True),
        (b"O\x01K", False),
        (b"O\x7fK", False),
        (b"Caf\xe9", False),  # Latin-1: not UTF-8, as a header value would be refused
    ],
)
def test_a_reason_phrase_follows_the_rules_of_a_value(raw: bytes, valid: bool) -> None:
    reason = raw.decode("utf-8", "surrogateescape")
    refusal = "control bytes or bytes that are not UTF-8 in the reason phrase"
    assert invalid_head(200, reason, ()) == (None if valid else refusal)
