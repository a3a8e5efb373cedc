"""The test suite's one raw-HTTP client and its command-line clients (curl), shared by every test file.

Raw replies are read to their framing (Content-Length, chunked, or the server's close), never "until
quiet", so a test waits exactly as long as the gateway takes and no longer than the hang guard.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families

HANG_GUARD_S = 15.0  # a bound on how long a broken test may hang; never a timing assertion


def basic(user: str, password: str) -> str:
    """A `Proxy-Authorization: Basic` value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape_text(admin_url: str) -> str:
    """A gateway's `/metrics` exposition, as sent."""
    async with aiohttp.ClientSession() as client, client.get(admin_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        return await resp.text()


async def scrape(admin_url: str) -> Samples:
    """Every sample of a gateway's `/metrics` as {(name, labels): value}."""
    text = await scrape_text(admin_url)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a labelled counter that never counted reads 0."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def queued(admin_port: int, count: int) -> None:
    """Wait until `count` requests wait for a rate-limit slot (a hang guard, not a timing check)."""
    async with asyncio.timeout(HANG_GUARD_S):
        while value(await scrape(f"http://127.0.0.1:{admin_port}"), "bt_gateway_rate_limit_queued") != count:
            await asyncio.sleep(0.02)


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`bt-gateway <args>` run to its end (this interpreter's `python -m gateway`), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def free_port() -> int:
    """A port nothing listens on now, on any address (tests bind 127.0.0.1 or 0.0.0.0), for a config that
    needs a fixed one (another process may take it)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


@dataclass
class Reply:
    """One HTTP/1.1 response as the client received it."""

    version: str  # "HTTP/1.1": the status line's protocol, which a test may pin
    status: int
    reason: str
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str:
        """The gateway's error code from a JSON error body."""
        return str(self.json()["error"]["code"])


def parse_head(head: bytes) -> tuple[str, int, str, CIMultiDict[str]]:
    """Version, status, reason and headers of a response head (names keep their case; lookups ignore it)."""
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    version, status, *reason = status_line.split(" ", 2)
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    return version, int(status), (reason[0] if reason else ""), headers


async def reply_of(resp: aiohttp.ClientResponse) -> Reply:
    """An aiohttp response as a Reply, so tests on either client share `assert_error`."""
    version = f"HTTP/{resp.version.major}.{resp.version.minor}" if resp.version else ""
    return Reply(version, resp.status, resp.reason or "", CIMultiDict(resp.headers), await resp.read())


def assert_error(reply: Reply, status: int, code: str) -> None:
    """Every gateway error is JSON with a stable code, a request id and a message: one check for all tests."""
    assert reply.status == status, reply
    assert reply.headers["Content-Type"].startswith("application/json")
    error = reply.json()["error"]
    assert error["code"] == code
    assert len(error["request_id"]) >= 16
    assert error["message"]


async def read_reply(reader: asyncio.StreamReader, *, head_only: bool = False) -> Reply:
    """Read one response: head, then the body its framing declares (`head_only`: HEAD, or a 2xx to CONNECT).

    Interim 1xx responses are skipped. The reader stays usable for the next response on the connection.
    """
    async with asyncio.timeout(HANG_GUARD_S):
        while True:
            version, status, reason, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
            if not 100 <= status < 200:
                break
        if head_only or status in (204, 304):
            body = b""
        elif "chunked" in headers.get("Transfer-Encoding", "").lower():
            body = await _read_chunked(reader)
        elif "Content-Length" in headers:
            body = await reader.readexactly(int(headers["Content-Length"]))
        else:
            body = await reader.read()  # framed by the server's close
    return Reply(version, status, reason, headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks = []
    while size := int((await reader.readline()).split(b";")[0], 16):
        chunks.append(await reader.readexactly(size))
        await reader.readline()
    while (await reader.readline()) not in (b"\r\n", b""):  # trailers
        pass
    return b"".join(chunks)


async def send_raw(port: int, data: bytes, *, head_only: bool = False, host: str = "127.0.0.1") -> Reply:
    """Write exact bytes on a fresh connection and read one response."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_reply(reader, head_only=head_only)
    finally:
        writer.close()


async def get(port: int, target: str, headers: str = "Host: gw\r\n") -> Reply:
    """`GET target` with the given header lines (each ending in CRLF) and `Connection: close`."""
    request = f"GET {target} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n"
    return await send_raw(port, request.encode("latin-1"))


async def closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (EOF or reset) with nothing more to say."""
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            return await reader.read(1) == b""
    except ConnectionError:
        return True


@contextlib.asynccontextmanager
async def raw_connect(
    port: int, target: str, headers: str = "", tail: bytes = b""
) -> AsyncIterator[tuple[Reply, asyncio.StreamReader, asyncio.StreamWriter]]:
    """Send `CONNECT target` (plus `tail`, pipelined); yield the reply and the still-open streams.

    A 2xx reply to CONNECT has no body: the connection becomes the tunnel.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{headers}\r\n".encode() + tail)
        await writer.drain()
        async with asyncio.timeout(HANG_GUARD_S):
            version, status, reason, head = parse_head(await reader.readuntil(b"\r\n\r\n"))
        if 200 <= status < 300:
            reply = Reply(version, status, reason, head, b"")
        else:
            length = int(head.get("Content-Length", "0"))
            async with asyncio.timeout(HANG_GUARD_S):
                reply = Reply(version, status, reason, head, await reader.readexactly(length))
        yield reply, reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def curl(*args: str) -> tuple[int, str, str]:
    """Run curl without blocking the event loop that may serve an in-process gateway.

    `-q` skips any .curlrc, and the *_proxy/NO_PROXY variables are dropped so only `-x` decides.
    """
    env = {name: value for name, value in os.environ.items() if "proxy" not in name.lower()}
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-q",
        "-sS",
        "--max-time",
        "15",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def curl_reply(*args: str) -> Reply:
    """Run `curl -i` and parse what it printed, for tests that check what curl itself was answered."""
    _, out, _ = await curl("-i", *args)
    head, _, body = out.partition("\r\n\r\n")
    return Reply(*parse_head(head.encode("latin-1")), body.encode())
