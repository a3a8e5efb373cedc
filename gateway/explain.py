"""`bt-gateway explain`: what the gateway would do with one request, asked of the steps `serve` runs.

A synthetic `Exchange` (no socket) goes through the generation's own chain with `Chain.trace`: each step
decides as it would for a real request, but steps that count (rate limits, failed proxy passwords) are
asked through their read-only `peek`. What the terminal step would use is then read off the same
generation: the upstream URL, the addresses its name resolves to through the egress resolver and whether
each passes the checks made where connections are opened, and whether the response would be rewritten.

The answer is one JSON-ready dict (shape `SHAPE`, documented in the README), printed as text or JSON by
the CLI and returned as is by the admin listener's `POST /explain`. Nothing here logs a token: the
request carries its sha256 only, and the answer names it by its fingerprint.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from multidict import CIMultiDict

from gateway.config.model import GatewayConfig
from gateway.errors import GatewayError, GatewayFailure
from gateway.exchange import Exchange
from gateway.generation import Generation
from gateway.policy.credentials import FINGERPRINT_HEX, digest_of
from gateway.policy.urlrewrite import REWRITE_HEADERS
from gateway.steps import Decision

SHAPE = 1  # the `explain` field of every answer; bumped only when a field changes meaning or goes away
EXIT_FORWARD, EXIT_REFUSED = 0, 1
LIMIT_STEPS = ("ratelimit", "tunnel_limit")
Report = dict[str, Any]


class ExplainUsageError(ValueError):
    """A request that cannot be asked (a malformed `-H`, a token given twice): a usage error, exit 2."""


@dataclass(frozen=True, slots=True)
class ExplainRequest:
    """One request to explain: what a client would send, minus the body."""

    method: str
    target: str  # origin-form (`/v1/x`), absolute-form (`http://h/x`) or, for CONNECT, `host:port`
    headers: tuple[tuple[str, str], ...] = ()
    client_ip: str = "127.0.0.1"
    resolve: bool = True


def parse_header(text: str) -> tuple[str, str]:
    """`Name: value`, as curl's `-H` takes it."""
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or name != name.strip():
        raise ExplainUsageError(f"header {text[:80]!r} is not 'Name: value'")
    return name, value.strip()


def explain_request(
    url: Sequence[str],
    *,
    method: str | None = None,
    token: str | None = None,
    headers: Sequence[str] = (),
    client_ip: str = "127.0.0.1",
    resolve: bool = True,
) -> ExplainRequest:
    """The request the CLI flags (or a POST /explain body) describe.

    `url` is one word (a path, an absolute URL, `host:port` with `-X CONNECT`) or `CONNECT host:port`,
    as one word or two. `token` is sent as `Authorization: Bearer <token>`.
    """
    words = " ".join(url).split()
    if len(words) == 2 and words[0].upper() == "CONNECT":
        if method is not None and method.upper() != "CONNECT":
            raise ExplainUsageError(f"-X {method} and CONNECT {words[1]}: name one method")
        method, words = "CONNECT", words[1:]
    if len(words) != 1:
        raise ExplainUsageError("give one URL: /path, http(s)://host/path, or CONNECT host:port")
    parsed = [parse_header(text) for text in headers]
    if token is not None:
        if any(name.lower() == "authorization" for name, _ in parsed):
            raise ExplainUsageError("give the token with --token or -H 'Authorization: ...', not both")
        parsed.append(("Authorization", f"Bearer {token}"))
    return ExplainRequest((method or "GET").upper(), words[0], tuple(parsed), client_ip, resolve)


def _exchange(request: ExplainRequest, config: GatewayConfig) -> Exchange:
    """The `Exchange` `serve` would build for this request. A client always sends Host: the target's
    authority in proxy mode, else (unless `-H Host` says otherwise) the gateway's own listen port."""
    headers: CIMultiDict[str] = CIMultiDict(request.headers)
    if "Host" not in headers:
        target = request.target
        if request.method == "CONNECT":
            headers["Host"] = target
        elif "://" in target:
            headers["Host"] = target.partition("://")[2].partition("/")[0].partition("?")[0]
        else:
            headers["Host"] = f"localhost:{config.listen.port}"
    return Exchange(
        request_id="explain",
        method=request.method,
        raw_target=request.target,
        client_ip=request.client_ip,
        headers=headers,
        scheme="https" if config.listen.tls is not None else "http",
        token_digest=digest_of(headers.get("Authorization")),
    )


async def explain(generation: Generation, request: ExplainRequest, *, live: bool = False) -> Report:
    """The report for one request. `live`: asked of a serving process (POST /explain), whose in-memory
    rate-limit counts are its own and worth showing; a CLI process has none."""
    exchange = _exchange(request, generation.config)
    chain = generation.connect if request.method == "CONNECT" else generation.http
    reached = await chain.trace(exchange)
    last = reached[-1][1] if reached else None
    final = last if last is not None and last.final else None
    report: Report = {
        "explain": SHAPE,
        "request": {
            "method": request.method,
            "url": request.target,
            "token_fingerprint": exchange.token_digest[:FINGERPRINT_HEX] if exchange.token_digest else None,
            "client_ip": request.client_ip,
        },
        **_verdict(final),
        "decided_by": reached[-1][0] if final is not None else None,
        "would_refuse": _would_refuse(exchange),
        "steps": _steps(chain.names, reached),
        "route": exchange.route,
        "upstream": _upstream(generation, exchange),
        "resolve": None,
        "rate_limit": _rate_limit(reached, live),
        "rewrite": _rewrite(generation, exchange) if final is None and exchange.connect is None else None,
    }
    if request.resolve and report["upstream"] is not None:
        report["resolve"], refused = await _resolve(generation, exchange)
        if final is None and refused is not None:  # the dialer would refuse every address: 403
            report.update(outcome="refuse", decided_by="dial", **_error(refused))
    return report


async def explain_all(config: GatewayConfig, requests: Sequence[ExplainRequest]) -> list[Report]:
    """Build the generation `serve` would (raising BuildError as `check-config` does), explain each
    request on it in turn, and close it."""
    generation = await Generation.build(config)
    try:
        return [await explain(generation, request) for request in requests]
    finally:
        await generation.close()


def exit_code(report: Report) -> int:
    return EXIT_FORWARD if report["outcome"] == "forward" else EXIT_REFUSED


def _verdict(final: Decision | None) -> Report:
    if final is None:
        return {"outcome": "forward", "status": None, "code": None, "reason": None, "detail": None}
    if final.error is None:
        return {"outcome": "redirect", "status": 302, "code": None, "reason": None, "detail": final.location}
    return {"outcome": "refuse", **_error(final.error)}


def _error(error: GatewayError) -> Report:
    return {"status": error.status, "code": str(error.code), "reason": error.why, "detail": error.detail}


def _would_refuse(exchange: Exchange) -> Report | None:
    """Report mode: the refusal enforce mode would have sent (the first one let go), or None."""
    if exchange.would_refuse is None:
        return None
    step, error = exchange.would_refuse
    return {"step": step, **_error(error)}


def _steps(names: Sequence[str], reached: Sequence[tuple[str, Decision | None]]) -> list[Report]:
    """Every step of the chain in order: its verdict, `pass` (nothing to decide) or `not_reached`."""
    steps: list[Report] = []
    for index, name in enumerate(names):
        entry: Report = {"step": name, "verdict": "not_reached", "status": None, "code": None}
        entry.update(reason=None, detail=None)
        if index < len(reached):
            decision = reached[index][1]
            entry["verdict"] = "pass" if decision is None else decision.outcome
            if decision is not None and decision.error is not None:
                entry.update(_error(decision.error))
        steps.append(entry)
    return steps


def _upstream(generation: Generation, exchange: Exchange) -> Report | None:
    """Where the terminal step would connect. A relay link's signed URL is never shown: its origin only."""
    via = generation.config.upstream.proxy
    proxy = None
    if via is not None:
        proxy = via.partition("://")[2].rpartition("@")[2]  # no user:password
    if exchange.connect is not None:
        target = exchange.connect
        return {"url": None, "host": target.host, "port": target.port, "via_proxy": proxy}
    if exchange.target is None:
        return None
    url = exchange.target.url
    shown = str(url.origin()) + " (a signed URL: the rest is withheld)" if exchange.relay else str(url)
    return {"url": shown, "host": url.raw_host, "port": url.port, "via_proxy": proxy}


async def _resolve(generation: Generation, exchange: Exchange) -> tuple[Report, GatewayError | None]:
    """The addresses the egress resolver gives the upstream's name (static `resolve:` entries, else DNS)
    and the checks each meets where connections are opened: the allow-list on the name always, and for
    tunnels with `deny_private_addresses` the address itself (gateway/dial.py). Second: the refusal the
    dialer would answer with when it refuses every address."""
    if exchange.connect is not None:
        host, port = exchange.connect.host, exchange.connect.port
    else:
        assert exchange.target is not None  # `_upstream` found one
        host, port = exchange.target.url.raw_host or "", exchange.target.url.port or 0
    tunnel = exchange.connect is not None
    policy = generation.dialer.policy if tunnel and generation.dialer is not None else None
    checks = ["allowlist"] + (["private_address"] if policy is not None and policy.checks_addresses else [])
    result: Report = {"host": host, "by": "gateway", "checks": checks, "addresses": [], "error": None}
    if generation.config.upstream.proxy is not None:
        result.update(by="upstream.proxy", checks=[])  # the corporate proxy resolves and connects
        return result, None
    try:
        async with asyncio.timeout(generation.config.upstream.connect_timeout_s):
            answers = await generation.resolver.resolve(host, port, socket.AF_UNSPEC)
    except GatewayFailure as exc:
        result["error"] = f"{exc.error.code}: {exc.error.detail}"
        return result, None
    except (OSError, TimeoutError) as exc:
        result["error"] = f"did not resolve: {exc.strerror if isinstance(exc, OSError) else 'no answer'}"
        return result, None
    refusals = []
    for answer in dict.fromkeys(a["host"] for a in answers):
        refused = policy.check_address(host, answer) if policy is not None else None
        reason = refused.why if refused is not None else None
        result["addresses"].append({"address": answer, "allowed": refused is None, "reason": reason})
        refusals.append(refused)
    every = bool(refusals) and None not in refusals
    return result, refusals[-1] if every else None


def _rate_limit(reached: Sequence[tuple[str, Decision | None]], live: bool) -> Report | None:
    """The rate-limit step's key and count, as its `peek` read them; None when the step was not reached.

    Counts in process memory are this process's own: shown by a serving process, withheld by the CLI
    (a fresh process, whose count would always read 0).
    """
    for name, decision in reached:
        if name in LIMIT_STEPS and decision is not None:
            facts = dict(decision.facts)
            if facts.get("shared"):
                note = "read from the shared store; explaining counted nothing"
            elif live:
                note = "this process's own count (in-memory storage: each process counts apart)"
            else:
                facts["count"] = None
                note = "in-memory storage: the count is per process and not visible from here"
            if facts.get("max_requests") is None:
                note = "no limit on this route"
            return {"step": name, "verdict": decision.outcome, **facts, "note": note}
    return None


def _rewrite(generation: Generation, exchange: Exchange) -> Report | None:
    """Whether the response would be rewritten: URL headers always, the body only on `rewrite.body_paths`
    (JSON, text, JavaScript and SSE bodies), with these rules for this client's external URL."""
    rewrite = generation.forwarder.rewrite
    if exchange.target is None:
        return None
    if rewrite is None or exchange.relay:
        why = "rewrite.enabled is false" if rewrite is None else "relay transfers pass as they are"
        return {"enabled": False, "body": False, "body_path": None, "headers": [], "rules": [], "note": why}
    body_path = rewrite.body_path(exchange)
    external = rewrite.external_url(exchange)
    rules = rewrite.policy.rule_pairs(external)
    return {
        "enabled": True,
        "body": body_path is not None,
        "body_path": body_path,
        "headers": list(REWRITE_HEADERS),
        "external_url": external,
        "rules": [{"from": source, "to": target} for source, target in rules],
        "note": "the body is rewritten when it is JSON, text, JavaScript or SSE"
        if body_path is not None
        else "not on rewrite.body_paths: the body passes byte for byte",
    }


def request_from_json(body: Mapping[str, Any]) -> ExplainRequest:
    """A POST /explain body: the CLI's flags as JSON fields (`url`, `method`, `token`, `no_token`,
    `headers` as `Name: value` strings, `client_ip`, `no_resolve`). No token unless one is given."""
    known = {"url", "method", "token", "no_token", "headers", "client_ip", "no_resolve"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise ExplainUsageError(f"unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}")
    url, method, token = body.get("url"), body.get("method"), body.get("token")
    headers, client_ip = body.get("headers", []), body.get("client_ip", "127.0.0.1")
    if not isinstance(url, str):
        raise ExplainUsageError("url: a string is required (/path, http(s)://host/path, CONNECT host:port)")
    if not all(isinstance(v, str | None) for v in (method, token)) or not isinstance(client_ip, str):
        raise ExplainUsageError("method, token and client_ip are strings")
    if not isinstance(headers, list) or not all(isinstance(h, str) for h in headers):
        raise ExplainUsageError("headers: a list of 'Name: value' strings")
    if body.get("no_token") and token is not None:
        raise ExplainUsageError("token and no_token: give one")
    return explain_request(
        [url],
        method=method,
        token=token,
        headers=headers,
        client_ip=client_ip,
        resolve=not body.get("no_resolve"),
    )
