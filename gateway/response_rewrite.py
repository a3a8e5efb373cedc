"""The response side of rewriting: which responses are rewritten, with which rules, and how.

User data is never rewritten: a body is rewritten only on `rewrite.body_paths`, the endpoints that hand out
URLs (login, upload slots, attachments); every other body passes byte for byte. URL headers (`Location`,
`Link`, ...) are rewritten on every response. A JSON body on one of those endpoints is read whole (it is a
small control document) so its signed URLs can be turned into relay links and every URL still pointing
around the gateway can be said (gateway/control_docs.py); anything else streams.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from gateway import control_docs, untrusted_json
from gateway.config.model import DEFAULT_BODY_PATHS
from gateway.exchange import Exchange
from gateway.policy.codec import Codec, open_codec, parse_content_encoding
from gateway.policy.external_url import ExternalUrl
from gateway.policy.paths import PathGlobs
from gateway.policy.urlrewrite import (
    BodyRewriter,
    RewriteAbandoned,
    RewriteLimits,
    RewritePolicy,
    RuleSet,
    rewritable,
)
from gateway.relay import Relay
from gateway.steps import is_proxied

JSON_BODY_LIMIT = 2**20  # a control document read whole: past this it passes unrewritten


class JsonBodyRewriter:
    """Reads a control document whole (bounded), applies the URL rules and the relay links, notes on the
    exchange what still routes around the gateway, and encodes it again."""

    __slots__ = (
        "_codec",
        "_decoded",
        "_exchange",
        "_gateway_url",
        "_limits",
        "_raw",
        "_relay",
        "_rules",
        "skipped",
    )

    def __init__(
        self,
        rules: RuleSet,
        codec: Codec,
        limits: RewriteLimits,
        *,
        exchange: Exchange,
        relay: Relay | None,
        gateway_url: str,
    ) -> None:
        """`relay`: None where no relay links are made (no relay configured, or a route not advertised)."""
        self._rules = rules
        self._codec = codec
        self._limits = limits
        self._exchange = exchange
        self._relay = relay
        self._gateway_url = gateway_url
        self._raw = 0
        self._decoded = bytearray()
        self.skipped: str | None = None

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        self._raw += len(chunk)
        for piece in self._codec.decode(chunk):
            self._decoded += piece
            if len(self._decoded) > min(JSON_BODY_LIMIT, self._limits.max_decoded):
                raise RewriteAbandoned("too_large")
        yield from ()

    def whole(self, data: bytes) -> bytes:
        """`feed(data)` then `finish()`, for a body already complete."""
        for _ in self.feed(data):
            pass  # feed yields nothing: it gathers the decoded text
        return self.finish()

    def finish(self) -> bytes:
        codec = self._codec
        self._decoded += codec.decode_end()
        text = self._rules.rewrite_all(bytes(self._decoded))
        try:
            doc = untrusted_json.loads(text)
        except ValueError:  # not JSON, or nested past its bound: passed on as it came
            doc = None
        if doc is not None:
            exchange = self._exchange
            changed, found = control_docs.inspect(
                doc, self._gateway_url, self._relay, exchange.route or "", token_digest=exchange.token_digest
            )
            for bypass in found:
                exchange.bypassed(bypass)
            if changed:
                text = json.dumps(doc).encode()
        return codec.encode(text) + codec.encode_end()


BodyTransform = BodyRewriter | JsonBodyRewriter


class ResponseRewrite:
    """Static rules, plus each advertised route's origin -> the gateway's own URL; built from config."""

    def __init__(
        self,
        policy: RewritePolicy,
        external: ExternalUrl,
        body_paths: PathGlobs,
        advertised: frozenset[str],
        relay: Relay | None,
    ) -> None:
        self.policy = policy
        self._external = external
        self._body_paths = body_paths
        self._advertised = advertised  # route names whose responses may carry relay links
        self._relay = relay
        self._control = PathGlobs(DEFAULT_BODY_PATHS)  # where the SDKs read the URLs they call next

    def external_url(self, exchange: Exchange) -> str | None:
        """The gateway's URL as this client reached it; absolute-form requests know none but advertise_url."""
        headers = exchange.headers
        return self._external.for_request(
            remote=exchange.client_ip,
            scheme=exchange.scheme,
            host=None if is_proxied(exchange) else headers.get("Host"),
            forwarded_proto=headers.get("X-Forwarded-Proto"),
            forwarded_host=headers.get("X-Forwarded-Host"),
        )

    def body_path(self, exchange: Exchange) -> str | None:
        """The upstream path when this response's body may be rewritten at all (it is on
        `rewrite.body_paths`), else None."""
        target = exchange.target
        if target is None:
            return None
        path = target.path
        return path if path is not None and self._body_paths.matches(path) else None

    def body(
        self,
        exchange: Exchange,
        rules: RuleSet,
        external: str | None,
        content_type: str | None,
        content_encoding: str | None,
        *,
        path: str,
    ) -> BodyTransform | None:
        """How a body on `body_paths` is rewritten, or None when it passes byte for byte anyway.

        `rules` are `policy.rules_for(external)`, `external` is `external_url(exchange)`, `path` is
        `body_path(exchange)`.
        """
        if not rewritable(content_type):
            return None
        encoding = parse_content_encoding(content_encoding)
        if encoding is None:
            return None
        mime = (content_type or "").split(";", 1)[0].strip().lower()
        json_body = mime == "application/json" or mime.endswith("+json")
        advertised = exchange.route in self._advertised
        if json_body and external is not None and (advertised or self._control.matches(path)):
            # A control document: the SDKs' known ones on any route, and every JSON body on
            # `body_paths` of an advertised (data-plane) route, where signed URLs are handed out.
            relay = self._relay if advertised else None
            codec = open_codec(encoding)
            return JsonBodyRewriter(
                rules, codec, self.policy.limits, exchange=exchange, relay=relay, gateway_url=external
            )
        return self.policy.body(rules, content_type, content_encoding)
