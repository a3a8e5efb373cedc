"""Shared fixtures: real upstream servers, a canary that records every connection, the gateway in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
import trustme
from aiohttp import web

from gateway.config.load import load_config
from gateway.config.model import GatewayConfig
from gateway.server import Gateway
from tests.upstream_app import Recorder, make_app


@dataclass
class Upstream:
    url: str
    port: int
    recorder: Recorder


NAME = "api.braintrust.test"  # the named TLS upstream's host name; only `resolve` maps can find it
STORE = "127.0.0.3"  # an object store listens on an address of its own


@dataclass
class NamedUpstream:
    """A TLS upstream reached by a name no DNS knows (`NAME`), with a certificate from the test CA."""

    port: int
    url: str  # https://api.braintrust.test:<port>
    recorder: Recorder


@dataclass
class Canary:
    """A listener that must never be reached: it counts accepts and answers nothing."""

    port: int
    accepts: list[bytes]


@dataclass
class RunningGateway:
    gateway: Gateway
    url: str
    admin_url: str


@pytest.fixture(scope="session")
def test_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_file(test_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    test_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def canary() -> AsyncIterator[Canary]:
    accepts: list[bytes] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepts.append(b"")
        with contextlib.suppress(TimeoutError):
            accepts[-1] = await asyncio.wait_for(reader.read(4096), 1)
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    yield Canary(port=server.sockets[0].getsockname()[1], accepts=accepts)
    server.close()
    await server.wait_closed()


async def _serve(
    app: web.Application, ssl_context: ssl.SSLContext | None = None, host: str = "127.0.0.1"
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=ssl_context)
    await site.start()
    server: Any = site._server
    return runner, server.sockets[0].getsockname()[1]


@pytest.fixture
async def upstream(canary: Canary) -> AsyncIterator[Upstream]:
    recorder = Recorder()
    runner, port = await _serve(make_app(recorder, f"http://127.0.0.1:{canary.port}/stolen"))
    yield Upstream(url=f"http://127.0.0.1:{port}", port=port, recorder=recorder)
    recorder.sse_gate.set()
    await runner.cleanup()


@pytest.fixture
async def private_upstream(canary: Canary) -> AsyncIterator[Upstream]:
    """The upstream app on 127.0.0.2, an address no test allow-list names: what must stay out of reach."""
    recorder = Recorder()
    runner, port = await _serve(
        make_app(recorder, f"http://127.0.0.1:{canary.port}/stolen"), host="127.0.0.2"
    )
    yield Upstream(url=f"http://127.0.0.2:{port}", port=port, recorder=recorder)
    await runner.cleanup()


@pytest.fixture
async def host_upstream(canary: Canary) -> AsyncIterator[Upstream]:
    """The upstream on every host address: containers reach it as `host.containers.internal`."""
    recorder = Recorder()
    runner, port = await _serve(make_app(recorder, f"http://127.0.0.1:{canary.port}/stolen"), host="0.0.0.0")
    yield Upstream(url=f"http://host.containers.internal:{port}", port=port, recorder=recorder)
    recorder.sse_gate.set()
    await runner.cleanup()


def server_tls(test_ca: trustme.CA, *names: str) -> ssl.SSLContext:
    """A server's TLS context with a certificate from the test CA for `names` (host names or addresses)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert(*names).configure_cert(context)
    return context


@pytest.fixture
def store_tls(test_ca: trustme.CA) -> ssl.SSLContext:
    """The fake object store's https (the relay relays https only); the gateway needs `ca_file` for it."""
    return server_tls(test_ca, STORE)


@pytest.fixture
async def tls_upstream(test_ca: trustme.CA, canary: Canary) -> AsyncIterator[Upstream]:
    recorder = Recorder()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    test_ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    runner, port = await _serve(make_app(recorder, f"http://127.0.0.1:{canary.port}/stolen"), context)
    yield Upstream(url=f"https://localhost:{port}", port=port, recorder=recorder)
    await runner.cleanup()


@contextlib.asynccontextmanager
async def serve_named_tls(
    test_ca: trustme.CA, canary: Canary, name: str = NAME
) -> AsyncIterator[NamedUpstream]:
    recorder = Recorder()
    context = server_tls(test_ca, name)
    runner, port = await _serve(make_app(recorder, f"http://127.0.0.1:{canary.port}/stolen"), context)
    try:
        yield NamedUpstream(port=port, url=f"https://{name}:{port}", recorder=recorder)
    finally:
        await runner.cleanup()


@pytest.fixture
async def named_tls(test_ca: trustme.CA, canary: Canary) -> AsyncIterator[NamedUpstream]:
    async with serve_named_tls(test_ca, canary) as upstream:
        yield upstream


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


YamlGatewayFactory = Callable[[str], Awaitable[RunningGateway]]
TEST_LISTENERS = (
    "listen: {host: 127.0.0.1, port: 0}\nadmin: {host: 127.0.0.1, port: 0}\nshutdown_timeout_s: 2\n"
)


@pytest.fixture
async def started_gateways() -> AsyncIterator[list[Gateway]]:
    """The in-process gateways a test started; each is drained and stopped at teardown."""
    started: list[Gateway] = []
    yield started
    for gateway in started:
        await gateway.stop()


async def _start(config: GatewayConfig, started: list[Gateway]) -> RunningGateway:
    gateway = Gateway(config)
    await gateway.start()
    started.append(gateway)
    return RunningGateway(
        gateway=gateway,
        url=f"http://127.0.0.1:{gateway.ports['listen']}",
        admin_url=f"http://127.0.0.1:{gateway.ports['admin']}",
    )


@pytest.fixture
def start_gateway(started_gateways: list[Gateway]) -> GatewayFactory:
    """Start gateways in-process on free ports, from config keys given as keyword arguments."""

    async def start(**overrides: Any) -> RunningGateway:
        data: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "shutdown_timeout_s": 2,
        }
        data.update(overrides)
        return await _start(GatewayConfig.model_validate(data), started_gateways)

    return start


@pytest.fixture
def start_yaml(started_gateways: list[Gateway], tmp_path: Path) -> YamlGatewayFactory:
    """Start an in-process gateway on a YAML file as a user writes it, read by the real loader (the
    listeners on free loopback ports are prepended)."""

    async def start(text: str) -> RunningGateway:
        path = tmp_path / "gateway.yaml"
        path.write_text(TEST_LISTENERS + text)
        return await _start(load_config(path, env={}).config, started_gateways)

    return start


def route_to(target: Upstream, /, **extra: Any) -> dict[str, Any]:
    """Config that sends every path to `target` and allow-lists only it; `extra` adds config keys."""
    host_port = target.url.split("://", 1)[1]
    return {
        "allowlist": [host_port],
        "routes": [{"name": "app", "prefix": "/", "upstream": target.url}],
        **extra,
    }


class Logs:
    """Every event the in-process gateways log during one test (structlog's capture, filled live)."""

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.entries = entries

    def named(self, event: str) -> list[dict[str, Any]]:
        return [entry for entry in self.entries if entry["event"] == event]

    async def access(self, path: str) -> dict[str, Any]:
        """The access event of the request to `path`, once the gateway logged it (bounded wait)."""
        async with asyncio.timeout(15):
            while not (found := [e for e in self.named("access") if e["path"] == path]):
                await asyncio.sleep(0.01)
        [event] = found
        return event


@pytest.fixture
def sdk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """An SDK subprocess inherits the test's environment: no stray proxies or Braintrust settings."""
    for name in (
        "BRAINTRUST_API_URL",
        "BRAINTRUST_PROXY_URL",
        "BRAINTRUST_APP_PUBLIC_URL",
        "BRAINTRUST_ORG_NAME",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def logs() -> Iterator[Logs]:
    with structlog.testing.capture_logs() as entries:
        yield Logs(entries)


# A scripted reply: given the connection and the request head just read, answer (reading any body it
# wants) and say whether the connection stays open for the next request.
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[bool]]


@dataclass
class RawUpstream:
    """An upstream that answers exactly the bytes a test gives it, per request path: for hostile replies.

    A reply is bytes (written as one piece; the request body, if any, is not read) or a `Script`.
    """

    url: str
    port: int
    replies: dict[str, bytes | Script]
    seen: list[str]
    connections: list[int]  # one entry per accepted connection: its number, from 1


def json_reply(doc: Any, headers: str = "") -> bytes:
    """A raw 200 answer carrying `doc` as JSON; `headers`: more header lines, each ending in CRLF."""
    body = json.dumps(doc, ensure_ascii=False).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + headers + "\r\n").encode() + body


@contextlib.asynccontextmanager
async def serve_raw(tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> AsyncIterator[RawUpstream]:
    """An upstream answering each request with the bytes (or the script) a test set for its path (https
    with `tls`, its URL then named `host`, which a `resolve` map must find)."""
    replies: dict[str, bytes | Script] = {}
    seen: list[str] = []
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections) + 1)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ", 2)[1].decode()
                seen.append(path)
                reply = replies[path]
                if isinstance(reply, bytes):
                    writer.write(reply)
                    await writer.drain()
                elif not await reply(reader, writer, head):
                    break
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if tls is not None else "http"
    try:
        yield RawUpstream(
            url=f"{scheme}://{host}:{port}", port=port, replies=replies, seen=seen, connections=connections
        )
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    async with serve_raw() as upstream:
        yield upstream


@pytest.fixture
async def raw_tls_upstream(test_ca: trustme.CA) -> AsyncIterator[RawUpstream]:
    """`raw_upstream` over https as `NAME` (certificate from the test CA)."""
    async with serve_raw(server_tls(test_ca, NAME), NAME) as upstream:
        yield upstream
