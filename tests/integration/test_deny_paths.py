"""`deny_paths` and Braintrust's DISABLE_SYSADMIN_TELEMETRY through the real CLI and a real upstream."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.clients import assert_error, get
from tests.conftest import Upstream
from tests.gateway_process import GatewayProcess


def data_route_config(upstream: Upstream, **extra: object) -> dict[str, object]:
    host = upstream.url.split("://")[1]
    return {
        "allowlist": [host],
        "routes": [
            {"name": "app", "prefix": "/", "upstream": upstream.url},
            {"name": "data", "prefix": "/data-plane", "upstream": upstream.url},
        ],
        **extra,
    }


@pytest.mark.parametrize("disabled", ["true", "false"])
async def test_disable_sysadmin_telemetry_denies_brainstore(
    tmp_path: Path, upstream: Upstream, disabled: str
) -> None:
    gw = GatewayProcess(data_route_config(upstream), tmp_path, env={"DISABLE_SYSADMIN_TELEMETRY": disabled})
    try:
        reply = await get(gw.port, "/data-plane/brainstore/backfill/status")
        other = await get(gw.port, "/data-plane/v1/project")
    finally:
        assert gw.stop() == 0
    assert other.status == 200
    if disabled == "true":
        assert_error(reply, 403, "path_denied")
        assert upstream.recorder.started == ["/v1/project"]  # the denied request never left
        [denied] = [a for a in gw.events("access") if a["status"] == 403]
        assert denied["reason"] == "path_denied" and "deny_paths:deny" in denied["decisions"]
    else:
        assert reply.status == 200


async def test_encoded_and_dotted_spellings_are_denied_too(tmp_path: Path, upstream: Upstream) -> None:
    gw = GatewayProcess(data_route_config(upstream, deny_paths=["/brainstore/**"]), tmp_path)
    try:
        for target in (
            "/data-plane/%62rainstore/x",
            "/data-plane/v1/..%2Fbrainstore",
            "/data-plane//brainstore",
        ):
            assert_error(await get(gw.port, target), 403, "path_denied")
        assert_error(await get(gw.port, "/data-plane/../../x"), 400, "bad_path")
    finally:
        assert gw.stop() == 0
    assert upstream.recorder.started == []
