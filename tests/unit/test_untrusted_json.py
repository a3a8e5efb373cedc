"""Upstream-controlled JSON without sockets: depth bounded, only ValueError ever raised."""

from __future__ import annotations

import pytest

from gateway.untrusted_json import MAX_DEPTH, JsonTooDeep, loads


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_documents_up_to_the_bound_parse() -> None:
    assert loads(nested(MAX_DEPTH)) is not None
    assert loads('{"org_info": [{"api_url": "https://x"}]}') == {"org_info": [{"api_url": "https://x"}]}


@pytest.mark.parametrize("text", [nested(MAX_DEPTH + 1), nested(100_000), '{"a": ' * 40 + "1" + "}" * 40])
def test_deeper_documents_are_refused(text: str) -> None:
    with pytest.raises(JsonTooDeep, match=f"nested deeper than {MAX_DEPTH}"):
        loads(text)


@pytest.mark.parametrize(
    "text", ["{", '{"a": NaN}', "[Infinity]", "-Infinity", b"\xff", '{"e": 1e999}', "[-1e400]"]
)
def test_what_is_not_json_is_a_value_error(text: str | bytes) -> None:
    with pytest.raises(ValueError):
        loads(text)
