"""Decoding Braintrust's audit resources header, as `braintrust.parse_audit_resources` does, but bounded."""

from __future__ import annotations

import base64
import gzip
import json

import pytest
from braintrust import parse_audit_resources

from gateway.audit import AuditDecodeError, decode_resources
from tests.upstream_app import AUDITED_RESOURCES, BAD_AUDIT, audit_headers


def test_decodes_what_the_sdk_decodes() -> None:
    value = audit_headers("/v1/x")["x-bt-audit-resources"]
    assert decode_resources(value) == parse_audit_resources(value) == AUDITED_RESOURCES


@pytest.mark.parametrize("path", sorted(BAD_AUDIT))
def test_malformed_values_raise_a_decode_error(path: str) -> None:
    with pytest.raises(AuditDecodeError):
        decode_resources(BAD_AUDIT[path])


def test_oversized_headers_are_not_decoded() -> None:
    big = json.dumps({"v": 1, "p": base64.b64encode(gzip.compress(b"[]")).decode() + "A" * 70_000})
    with pytest.raises(AuditDecodeError, match="over 65536 bytes"):
        decode_resources(big)
