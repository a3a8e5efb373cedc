"""`invalid_head`: the one-pass check of an upstream head agrees with the per-field rules it stands for."""

from __future__ import annotations

import re

from hypothesis import given
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
def test_a_head_is_refused_exactly_when_one_of_its_fields_breaks_the_rules(
    raw_headers: tuple[tuple[bytes, bytes], ...],
) -> None:
    expected_valid = all(field_is_valid(name, value) for name, value in raw_headers)
    assert (invalid_head(200, raw_headers) is None) == expected_valid


def test_what_a_refusal_names() -> None:
    assert invalid_head(200, ((b"Content-Length ", b"2"),)) == "header name b'Content-Length '"
    assert invalid_head(200, ((b"X", b"a\nb"),)) == "control bytes in header X"
    assert invalid_head(200, ((b"X", b"\xff"),)) == "header X is not valid UTF-8"
    assert invalid_head(200, ((b"A", b"1"), (b"", b"2"))) == "header name b''"
    assert invalid_head(101, ()) == "status 101"
    assert invalid_head(200, ((b"Server", b"nginx"), (b"X-Name", "café".encode()))) is None
