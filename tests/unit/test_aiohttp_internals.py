"""The installed aiohttp has every private name the gateway uses, and its parser errors read as expected."""

from __future__ import annotations

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
