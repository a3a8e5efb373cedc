from __future__ import annotations

import aiohttp
from yarl import URL

from tests.conftest import GatewayFactory, Upstream, route_to


async def test_get_passes_through(start_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await start_gateway(**route_to(upstream))
    async with aiohttp.ClientSession() as client, client.get(URL(gw.url + "/v1/x?a=%41&b", encoded=True)) as resp:
        body = await resp.json()
    assert resp.status == 200
    assert body["raw_path"] == "/v1/x?a=%41&b"
    print(body, dict(resp.headers))
