"""Braintrust audit headers: ask each upstream for them, decode them, write one audit event per request.

Braintrust's API answers a request carrying `x-bt-enable-audit: true` with
    x-bt-audit-user-id, x-bt-audit-user-email, x-bt-audit-normalized-url (e.g. /v1/project/[id]),
    x-bt-audit-resources = JSON {"v": 1, "p": base64(gzip(JSON list of {type, id, name}))}
(what `braintrust.parse_audit_resources` decodes). A malformed header is recorded as an
`audit_decode_error` in the event; the request itself is never harmed. Decoding is bounded in size and
in depth (gateway/untrusted_json.py).
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any, Literal

from multidict import CIMultiDict

from gateway import untrusted_json
from gateway.exchange import Exchange
from gateway.policy.credentials import FINGERPRINT_HEX
from gateway.untrusted_json import JsonTooDeep

ENABLE = "x-bt-enable-audit"
PREFIX = "x-bt-audit-"
FIELDS = (("user_id", "x-bt-audit-user-id"), ("user_email", "x-bt-audit-user-email"))
NORMALIZED_URL = "x-bt-audit-normalized-url"
RESOURCES = "x-bt-audit-resources"
MAX_ENCODED = 64 * 1024  # a resources header larger than this is not decoded
MAX_DECODED = 1024 * 1024  # nor one that inflates past this


class AuditDecodeError(ValueError):
    """The resources header is not what Braintrust's protocol version 1 describes."""


def decode_resources(value: str) -> list[Any]:
    """The resource list of an `x-bt-audit-resources` value; raise AuditDecodeError saying what is wrong."""
    if len(value) > MAX_ENCODED:
        raise AuditDecodeError(f"header is over {MAX_ENCODED} bytes")
    try:
        envelope = untrusted_json.loads(value)
    except JsonTooDeep as exc:
        raise AuditDecodeError(f"header is {exc}") from None
    except ValueError:
        raise AuditDecodeError("header is not JSON") from None
    if not isinstance(envelope, dict) or envelope.get("v") != 1 or not isinstance(envelope.get("p"), str):
        raise AuditDecodeError('not a version 1 envelope {"v": 1, "p": ...}')
    try:
        packed = base64.b64decode(envelope["p"], validate=True)
    except (ValueError, binascii.Error):
        raise AuditDecodeError("payload is not base64") from None
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)  # gzip framing
    try:
        raw = inflater.decompress(packed, MAX_DECODED)
    except zlib.error:
        raise AuditDecodeError("payload is not gzip") from None
    if inflater.unconsumed_tail:
        raise AuditDecodeError(f"payload inflates past {MAX_DECODED} bytes")
    try:
        resources = untrusted_json.loads(raw)
    except JsonTooDeep as exc:
        raise AuditDecodeError(f"payload is {exc}") from None
    except ValueError:
        raise AuditDecodeError("payload is not a JSON list") from None
    if not isinstance(resources, list):
        raise AuditDecodeError("payload is not a JSON list")
    return resources


class AuditSink:
    """JSON lines to stdout or appended to a file; `reopen` follows a rotated file (SIGHUP)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._file: IO[str] = sys.stdout if target == "stdout" else self._open()

    def _open(self) -> IO[str]:
        try:
            return open(self.target, "a", encoding="utf-8", buffering=1)
        except OSError as exc:
            raise ValueError(f"cannot open {self.target!r} for appending: {exc.strerror or exc}") from None

    def write(self, event: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(event, separators=(",", ":"), default=str) + "\n")
        if self._file is sys.stdout:
            self._file.flush()

    def reopen(self) -> None:
        if self._file is not sys.stdout:
            old, self._file = self._file, self._open()
            old.close()

    def close(self) -> None:
        if self._file is not sys.stdout:
            self._file.close()


class Audit:
    """The audit policy of one generation: what to ask upstream, what clients see, what is written."""

    def __init__(self, sink: AuditSink, expose: Literal["auto", "always", "never"]) -> None:
        self.sink = sink
        self._expose = expose

    @staticmethod
    def upstream_headers() -> tuple[tuple[str, str], ...]:
        return ((ENABLE, "true"),)

    def capture(self, exchange: Exchange, upstream: Mapping[str, str], downstream: CIMultiDict[str]) -> None:
        """Keep the audit headers for the event; the client sees them only as `expose_to_client` says."""
        found = {name.lower(): value for name, value in upstream.items() if name.lower().startswith(PREFIX)}
        exchange.audit = found
        client_asked = exchange.headers.get(ENABLE, "").strip().lower() == "true"
        if self._expose == "never" or (self._expose == "auto" and not client_asked):
            for name in found:
                downstream.popall(name, None)

    def record(self, exchange: Exchange) -> None:
        """One audit event for a finished request, whether or not it reached an upstream."""
        found = exchange.audit or {}
        event: dict[str, Any] = {
            "event": "audit",
            "time": datetime.now(UTC).isoformat(),
            "request_id": exchange.request_id,
            "token_fp": exchange.token_digest[:FINGERPRINT_HEX] if exchange.token_digest else None,
            "client": exchange.client_ip,
            "method": exchange.method,
            "route": exchange.route,
            "upstream_host": exchange.upstream_host,
            "status": exchange.status,
            **{key: found.get(header) for key, header in FIELDS},
            "normalized_url": found.get(NORMALIZED_URL),
            "resources": None,
            "decisions": exchange.decisions,
        }
        if RESOURCES in found:
            try:
                event["resources"] = decode_resources(found[RESOURCES])
            except AuditDecodeError as exc:
                event["audit_decode_error"] = str(exc)
        self.sink.write(event)
