"""The head the gateway writes itself for a whole answer: aiohttp's framing, never a split line."""

from __future__ import annotations

import pytest
from aiohttp import HttpVersion10
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.direct_response import head_bytes

DATE = "Sun, 06 Nov 1994 08:49:37 GMT"


def test_the_head_is_the_status_line_the_fields_and_a_blank_line() -> None:
    request = make_mocked_request("GET", "/", headers={"Connection": "close"}, closing=True)
    fields = CIMultiDict([("Date", DATE), ("Content-Length", "2"), ("Vary", "a"), ("Vary", "b")])
    assert head_bytes(request, 201, "Created", fields) == (
        b"HTTP/1.1 201 Created\r\nDate: " + DATE.encode() + b"\r\nContent-Length: 2\r\nVary: a\r\nVary: b\r\n"
        b"Connection: close\r\n\r\n",
        False,
    )


@pytest.mark.parametrize(
    ("reason", "fields"),
    [
        ("OK", [("X-A", "1\r\nSet-Cookie: injected=1")]),
        ("OK", [("X-A", "bare\rcarriage")]),
        ("OK", [("X-A", "bare\nline feed")]),
        ("OK\r\nX-B: 1", []),
        ("O\x01K", []),  # control characters aiohttp's serializer refuses
        ("OK", [("X-A", "a\x7fb")]),
        ("Caf\udce9", []),  # a byte that was not UTF-8: aiohttp drops it
        ("OK", [("X-A", "a\tb")]),  # a tab: aiohttp sends it, so aiohttp does
    ],
)
def test_a_line_that_is_not_all_printable_is_never_written_here(
    reason: str, fields: list[tuple[str, str]]
) -> None:
    request = make_mocked_request("GET", "/")
    assert head_bytes(request, 200, reason, CIMultiDict([("Date", DATE), *fields])) is None


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_answers_without_a_body_are_left_to_aiohttps_framing(method: str, status: int) -> None:
    request = make_mocked_request(method, "/", version=HttpVersion10)
    assert head_bytes(request, status, "x", CIMultiDict()) is None
