"""The real Braintrust TypeScript SDK (npm `braintrust` 3.35.0) through the gateway, in reverse mode.

`node tests/js/flow.mjs` logs in with BRAINTRUST_APP_URL set to the gateway; the gateway rewrites the
login's `api_url` to <gateway>/data-plane, so every data-plane call comes back through it to the fake.
`make test` installs tests/js/node_modules (`npm ci`); without node or that install the test is skipped on
a developer machine but fails under CI=true, where a skip would hide a broken JS client.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import GatewayFactory
from tests.fake_braintrust import FakeBraintrust, PlaneRecord
from tests.tools import unavailable

pytestmark = pytest.mark.sdk

JS_DIR = Path(__file__).resolve().parents[1] / "js"
PUBLIC = "https://public.example.com"
API_KEY = "sk-js-e2e-test-key-0123456789"
FLOW_LIMIT_S = 120.0
VIA = "1.1 bt-gateway"


def require_node() -> str:
    node = shutil.which("node")
    missing = None
    if node is None:
        missing = "node is not installed"
    elif not (JS_DIR / "node_modules" / "braintrust" / "package.json").is_file():
        missing = "tests/js/node_modules is not installed (run `make test`, which runs `npm ci`)"
    if missing is not None:
        unavailable(missing)
    assert node is not None
    return node


@pytest.fixture
async def fake() -> AsyncIterator[FakeBraintrust]:
    async with FakeBraintrust(api_key=API_KEY) as planes:
        yield planes


async def run_flow(node: str, env: dict[str, str]) -> dict[str, Any]:
    """`node flow.mjs` as a child of the event loop that serves the gateway; bounded, killed on timeout."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("BRAINTRUST_") and k.lower() not in {"http_proxy", "https_proxy", "all_proxy"}
    }
    proc = await asyncio.create_subprocess_exec(
        node,
        str(JS_DIR / "flow.mjs"),
        cwd=JS_DIR,
        env={**clean, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), FLOW_LIMIT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"flow.mjs exited {proc.returncode}: {err.decode()[-4000:]}"
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


def _templated(plane: PlaneRecord, ids: dict[str, str]) -> set[tuple[str, str]]:
    calls = set()
    for method, path in plane.calls():
        templ = path
        for oid, name in ids.items():
            templ = templ.replace(oid, name)
        calls.add((method, templ))
    return calls


async def test_js_sdk_through_the_gateway_as_app_url(
    start_gateway: GatewayFactory, fake: FakeBraintrust
) -> None:
    node = require_node()
    gw = await start_gateway(public_url=PUBLIC, **fake.gateway_config(rate_limit="off"))
    out = await run_flow(
        node,
        {
            "BRAINTRUST_APP_URL": gw.url,
            "BRAINTRUST_API_KEY": API_KEY,
            "BRAINTRUST_APP_PUBLIC_URL": PUBLIC,
            "NO_PROXY": "127.0.0.1,localhost",
        },
    )

    # The login response the SDK saw sent its data plane back through the gateway.
    assert out["login"] == {
        "apiUrl": f"{gw.url}/data-plane",
        "proxyUrl": f"{gw.url}/data-plane",
        "orgName": "acme",
    }

    # What the SDK saw: its own rows, its scores, the Eval's results.
    store = fake.store
    project = store.project("proj-js")
    experiment = store.experiments[out["experiment"]["id"]]
    dataset = store.datasets[out["dataset"]["id"]]
    assert (experiment["name"], dataset["name"]) == ("exp-js", "ds-js")
    assert experiment["project_id"] == dataset["project_id"] == project["id"]
    assert out["experiment"]["name"] == "exp-js"
    assert out["experiment"]["url"] == f"{PUBLIC}/app/acme/p/proj-js/experiments/exp-js"
    assert out["experiment"]["scores"] == {"accuracy": pytest.approx(2.5 / 3)}
    assert out["dataset"]["rows"] == [["a", "b"], ["c", "d"]]
    assert out["dataset"]["totalRecords"] == 2
    assert out["logger"]["projectId"] == project["id"]
    evaluated = store.experiments[out["eval"]["experimentId"]]
    assert evaluated["project_id"] == project["id"]
    assert out["eval"]["experimentName"] == evaluated["name"] == "eval-js"
    assert out["eval"]["outputs"] == [2, 4, 6]
    assert out["eval"]["errors"] == 0
    assert out["eval"]["scores"] == {"accuracy": pytest.approx(2 / 3)}
    assert out["comparison"] == {"name": "eval-js", "diffs": {"accuracy": pytest.approx(2.5 / 3 - 2 / 3)}}

    # The fake holds what the SDK logged.
    logged = store.rows_of("experiment", experiment["id"])
    assert sorted((r["input"], r["output"]) for r in logged if "scores" in r) == [(0, 0), (1, 2), (2, 4)]
    (step,) = [r for r in logged if r.get("span_attributes", {}).get("name") == "step"]
    assert (step["input"], step["output"], step["metadata"]) == ("q", "a", {"via": "traced"})
    ds_rows = store.rows_of("dataset", dataset["id"])
    assert sorted((r["input"], r["expected"]) for r in ds_rows) == [("a", "b"), ("c", "d")]
    (log_row,) = [r for r in store.rows_of("project_logs", project["id"]) if r.get("input") == "hello"]
    assert log_row["id"] == out["logger"]["rowId"]
    assert (log_row["output"], log_row["scores"]) == ("world", {"polite": 1})
    eval_rows = [r for r in store.rows_of("experiment", evaluated["id"]) if "expected" in r]
    assert sorted((r["input"], r["output"], r["expected"]) for r in eval_rows) == [
        (1, 2, 2),
        (2, 4, 4),
        (3, 6, 7),
    ]

    # Every call went through the gateway, carried the key, and was one the fake understands.
    for plane in (fake.control, fake.data):
        assert plane.requests, plane.name
        for request in plane.requests:
            assert VIA in request.headers.get("Via", ""), f"{request.path} reached {plane.name} directly"
            assert request.bearer == API_KEY, (plane.name, request.path)
        assert [r.path for r in plane.requests if r.status == 404] == [], plane.name
    # The only non-2xx answer: "no base experiment" (400), which the SDK expects and handles.
    assert {(r.path, r.status) for plane in (fake.control, fake.data) for r in plane.failures()} <= {
        ("/api/base_experiment/get_id", 400)
    }
    ids = {experiment["id"]: "{exp}", evaluated["id"]: "{exp}", dataset["id"]: "{ds}"}
    assert _templated(fake.control, ids) == {
        ("POST", "/api/apikey/login"),
        ("POST", "/api/project/register"),
        ("POST", "/api/experiment/register"),
        ("POST", "/api/dataset/register"),
        ("POST", "/api/base_experiment/get_id"),
    }
    assert _templated(fake.data, ids) == {
        ("GET", "/version"),
        ("POST", "/logs3"),
        ("POST", "/btql"),
        ("GET", "/experiment-comparison2"),
        ("GET", "/v1/experiment/{exp}"),
        ("GET", "/dataset-summary"),
    }
