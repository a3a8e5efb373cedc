"""The effective config as plain data with secrets hidden, for `check-config` and start-up logs."""

from __future__ import annotations

from typing import Any

from yarl import URL

from gateway.config.model import GatewayConfig
from gateway.policy.storage_uri import parse_storage_uri

MASK = "***"


def _redact_url(value: str) -> str:
    url = URL(value)
    if url.raw_password is not None:
        return str(url.with_password(MASK))
    if url.raw_user is not None:
        return str(url.with_user(MASK))
    return value


def redacted(config: GatewayConfig) -> dict[str, Any]:
    """`model_dump` with credentials in URLs masked; never print a config any other way."""
    data = config.model_dump(mode="json", by_alias=True)
    upstream = data["upstream"]
    if upstream.get("proxy"):
        upstream["proxy"] = _redact_url(upstream["proxy"])
    rate_limit = data["rate_limit"]
    rate_limit["storage"] = parse_storage_uri(rate_limit["storage"]).masked()
    if rate_limit["storage_password"] is not None:
        rate_limit["storage_password"] = MASK
    if data["admin"]["token"] is not None:
        data["admin"]["token"] = MASK
    if data["forward_proxy"]["auth"]:
        data["forward_proxy"]["auth"]["users"] = dict.fromkeys(data["forward_proxy"]["auth"]["users"], MASK)
    return data
