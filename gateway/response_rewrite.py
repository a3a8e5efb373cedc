"""The response side of rewriting: which responses are rewritten, with which rules, and how.

User data is never rewritten: a body is rewritten only on `rewrite.body_paths`, the endpoints that hand out
URLs (login, upload slots, attachments); every other body passes byte for byte. URL headers (`Location`,
`Link`, ...) are rewritten on every response. A JSON body of an advertised route is read whole (it is a
small control document) so its signed URLs can be turned into relay links; anything else streams.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from gateway.exchange import Exchange
from gateway.policy.codec import Codec, open_codec, parse_content_encoding
from gateway.policy.external_url import ExternalUrl
from gateway.policy.paths import PathGlobs, normalize_path
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
    """Reads a JSON body whole (bounded), applies the URL rules and the relay links, encodes it again."""

    __slots__ = (
        "_codec",
        "_decoded",
        "_gateway_url",
        "_limits",
        "_raw",
        "_relay",
        "_route",
        "_rules",
        "skipped",
    )

    def __init__(
        self,
        rules: RuleSet,
        codec: Codec,
        limits: RewriteLimits,
        *,
        relay: Relay,
        route: str,
        gateway_url: str,
    ) -> None:
        self._rules = rules
        self._codec = codec
        self._limits = limits
        self._relay = relay
        self._route = route
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
            doc = json.loads(text)
        except ValueError:
            doc = None
        if doc is not None and self._relay.rewrite(doc, self._route, self._gateway_url):
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

    def body_path(self, exchange: Exchange) -> bool:
        """Whether this response's body may be rewritten at all: its path is on `rewrite.body_paths`."""
        target = exchange.target
        if target is None:
            return False
        path = normalize_path(target.route.relative_path(target.url))
        return path is not None and self._body_paths.matches(path)

    def body(
        self,
        exchange: Exchange,
        rules: RuleSet,
        external: str | None,
        content_type: str | None,
        content_encoding: str | None,
    ) -> BodyTransform | None:
        """How a body on `body_paths` is rewritten, or None when it passes byte for byte anyway.

        `rules` are `policy.rules_for(external)`, `external` is `external_url(exchange)`.
        """
        if not rewritable(content_type):
            return None
        encoding = parse_content_encoding(content_encoding)
        if encoding is None:
            return None
        mime = (content_type or "").split(";", 1)[0].strip().lower()
        json_body = mime == "application/json" or mime.endswith("+json")
        relay = self._relay
        if relay is not None and json_body and exchange.route in self._advertised and external is not None:
            assert exchange.route is not None
            codec = open_codec(encoding)
            return JsonBodyRewriter(
                rules, codec, self.policy.limits, relay=relay, route=exchange.route, gateway_url=external
            )
        return self.policy.body(rules, content_type, content_encoding)
