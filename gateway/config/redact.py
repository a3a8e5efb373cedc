"""The effective config as plain data with secrets hidden, for `check-config` and start-up logs, and its
sha256 (`bt_gateway_config_info`)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from yarl import URL

from gateway.config.model import GatewayConfig
from gateway.policy.storage_uri import parse_storage_uri

MASK = "***"


def redact_url(value: str) -> str:
    """The URL with its password masked (or its user, when it carries no password)."""
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
        upstream["proxy"] = redact_url(upstream["proxy"])
    rate_limit = data["rate_limit"]
    rate_limit["storage"] = parse_storage_uri(rate_limit["storage"]).masked()
    if rate_limit["storage_password"] is not None:
        rate_limit["storage_password"] = MASK
    for section, key in (("admin", "token"), ("relay", "secret")):
        if data[section][key] is not None:
            data[section][key] = MASK
    if data["forward_proxy"]["auth"]:
        data["forward_proxy"]["auth"]["users"] = dict.fromkeys(data["forward_proxy"]["auth"]["users"], MASK)
    return data


def config_sha256(config: GatewayConfig) -> str:
    """The sha256 of the effective config (file, env, flags and defaults) as `check-config` prints it, in
    canonical JSON (sorted keys, no spaces): replicas that behave alike share it, whatever the file's
    layout or comments. Secrets are masked first: /metrics is unauthenticated, and a hash of a document
    holding a secret is a fingerprint of that secret, so rotating a secret alone leaves it unchanged."""
    text = json.dumps(redacted(config), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()
