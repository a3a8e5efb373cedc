"""The installed aiohttp has every private name the gateway uses, and its parser errors read as expected."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from gateway import aiohttp_internals


def test_the_installed_aiohttp_has_what_the_gateway_uses() -> None:
    aiohttp_internals.check()


def test_a_missing_internal_is_named_with_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(web.BaseSite, "_server")  # a slot, inherited by TCPSite
    with pytest.raises(
        aiohttp_internals.AiohttpMismatch, match=r"aiohttp \d+\.\d+\.\d+ lacks .*TCPSite\._server"
    ):
        aiohttp_internals.check()


async def test_a_closed_connection_keeps_no_read_timer() -> None:
    """The lazy read timer outlives a finished response (it fires and finds nothing to do), never the
    connection: a pending timer would hold a closed protocol for up to `read_timeout_s`."""
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        _, protocol = await loop.create_connection(
            lambda: aiohttp_internals.ClientProtocol(loop), "127.0.0.1", port
        )
        protocol.use_parser(False, {"read_timeout": 60})
        protocol.start_timeout()
        timer = protocol._read_timeout_handle
        assert timer is not None
        protocol._drop_timeout()  # a response ended: the timer stays, with nothing to time out
        assert protocol._read_timeout_handle is timer and not timer.cancelled()
        protocol.close()
        assert protocol._read_timeout_handle is None and timer.cancelled()
    finally:
        server.close()
        await server.wait_closed()
