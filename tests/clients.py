"""The test suite's one raw-HTTP client and its command-line clients (curl, headless Chromium), shared by
every test file.

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
from html.parser import HTMLParser
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


@dataclass
class Rendered:
    """A page's DOM as the browser holds it: each element's text by id, and each table's body rows."""

    html: str
    texts: dict[str, str]
    attributes: dict[str, dict[str, str]]  # id -> that element's attributes
    tables: dict[str, list[list[str]]]  # table id -> body rows -> cell texts


class _DomReader(HTMLParser):
    """Collects `Rendered` from serialized HTML (the browser's `outerHTML`, not the page's source)."""

    VOID = frozenset({"meta", "link", "br", "img", "input", "hr", "col", "source", "wbr", "area", "base"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.texts: dict[str, str] = {}
        self.attributes: dict[str, dict[str, str]] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self._open: list[str | None] = []  # the ids of the open elements (None: no id)
        self._table: str | None = None
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        ident = values.get("id")
        if ident is not None:
            self.texts[ident] = ""
            self.attributes[ident] = values
        if tag == "table" and ident is not None:
            self._table = ident
            self.tables[ident] = []
        elif tag == "tbody" and self._table is not None:
            self._in_body = True
        elif tag == "tr" and self._in_body and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td" and self._in_body and self._table is not None:
            self._cell = []
        if tag not in self.VOID:
            self._open.append(ident)

    def handle_endtag(self, tag: str) -> None:
        if tag in self.VOID:
            return
        if self._open:
            self._open.pop()
        if tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        for ident in self._open:
            if ident is not None:
                self.texts[ident] += data
        if self._cell is not None:
            self._cell.append(data)


def rendered(html: str) -> Rendered:
    reader = _DomReader()
    reader.feed(html)
    reader.close()
    return Rendered(html, reader.texts, reader.attributes, reader.tables)


class BrowserPage:
    """One tab of `HeadlessChromium`: what it requested, what it logged, its DOM and its looks."""

    def __init__(self, browser: HeadlessChromium, session: str) -> None:
        self._browser = browser
        self.session = session
        self.requests: list[str] = []  # every URL the page asked for (Network.requestWillBeSent)
        self.log: list[dict[str, Any]] = []  # browser messages: CSP violations, failed loads, script errors

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        return await self._browser.call(method, session=self.session, **params)

    async def evaluate(self, expression: str) -> Any:
        reply = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def wait_for(self, expression: str, within_s: float = HANG_GUARD_S) -> Any:
        """The value of `expression` once it is truthy in the page (polled; a hang guard, not a timing)."""
        async with asyncio.timeout(within_s):
            while not (value := await self.evaluate(expression)):
                await asyncio.sleep(0.05)
        return value

    async def dom(self) -> Rendered:
        return rendered(await self.evaluate("document.documentElement.outerHTML"))

    async def screenshot(self, path: Path) -> None:
        reply = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(reply["data"]))


class HeadlessChromium:
    """Debian's `chromium`, headless, driven over the DevTools protocol (a WebSocket, with aiohttp).

    It runs with a profile of its own, no background networking, and no name resolving but 127.0.0.1's, so
    even a request the test failed to notice could not leave the machine.
    """

    def __init__(self, proc: asyncio.subprocess.Process, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._proc = proc
        self._socket = socket
        self._ids = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pages: dict[str, BrowserPage] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for message in self._socket:
            data = json.loads(message.data)
            if "id" in data:
                future = self._waiting.pop(data["id"])
                if "error" in data:
                    future.set_exception(AssertionError(f"DevTools: {data['error']}"))
                else:
                    future.set_result(data.get("result", {}))
                continue
            page = self._pages.get(data.get("sessionId", ""))
            if page is None:
                continue
            params = data.get("params", {})
            if data["method"] == "Network.requestWillBeSent":
                page.requests.append(params["request"]["url"])
            elif data["method"] == "Log.entryAdded":
                page.log.append(params["entry"])
            elif data["method"] == "Runtime.exceptionThrown":
                page.log.append(params["exceptionDetails"])

    def close(self) -> None:
        self._reader.cancel()

    async def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._ids += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._ids] = future
        message: dict[str, Any] = {"id": self._ids, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self._socket.send_json(message)
        async with asyncio.timeout(HANG_GUARD_S):
            return await future

    async def open(self, url: str, width: int = 1280, height: int = 900) -> BrowserPage:
        """A new tab, recording its requests and messages from before it asks for `url`."""
        target = await self.call("Target.createTarget", url="about:blank")
        attached = await self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        page = self._pages[attached["sessionId"]] = BrowserPage(self, attached["sessionId"])
        for domain in ("Network", "Page", "Runtime", "Log"):
            await page.call(f"{domain}.enable")
        await page.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        await page.call("Page.navigate", url=url)
        return page


@contextlib.asynccontextmanager
async def headless_chromium(binary: str, profile: Path) -> AsyncIterator[HeadlessChromium]:
    """Start Chromium on a free DevTools port (it prints the WebSocket URL) and stop it at the end."""
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    output: list[bytes] = []
    drain: asyncio.Task[bytes] | None = None
    try:
        async with asyncio.timeout(30):  # a cold start of Chromium on a busy machine
            while not (line := await proc.stderr.readline()).startswith(b"DevTools listening on "):
                output.append(line)
                if not line:
                    raise RuntimeError(f"chromium exited: {b''.join(output).decode(errors='replace')}")
        drain = asyncio.get_running_loop().create_task(proc.stderr.read())  # never let the pipe fill
        url = line.decode().removeprefix("DevTools listening on ").strip()
        async with aiohttp.ClientSession() as client, client.ws_connect(url, max_msg_size=0) as socket:
            browser = HeadlessChromium(proc, socket)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if drain is not None:
            await drain
