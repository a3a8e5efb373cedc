"""The fake Braintrust planes against the real SDK (0.47.0), with no gateway in between.

If these pass, a failure of the gateway end-to-end test is the gateway's, not the fake's. The SDK is
synchronous (requests) with background flusher threads, so each SDK call runs in a daemon thread while
the fake's aiohttp servers keep serving on the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from tests.fake_braintrust import FakeBraintrust
from tests.sdk_flow import log_large_batch, run_sdk_flow

braintrust = pytest.importorskip("braintrust")
from braintrust import logger as bt_logger  # noqa: E402

pytestmark = pytest.mark.sdk

API_KEY = "sk-fake-braintrust-test-0123456789"
STORE = "127.0.0.3"  # the object store listens on its own loopback address
SDK_LIMIT_S = 60.0

P = ParamSpec("P")
T = TypeVar("T")


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`asyncio.to_thread`, but on a daemon thread and bounded: a hung SDK call fails the test instead of
    hanging the loop's teardown (which joins `to_thread`'s executor without a limit)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if done.done():  # the wait already gave up
            return
        if ok:
            done.set_result(value)
        else:
            done.set_exception(value)

    def run() -> None:
        value: Any
        try:
            ok, value = True, fn(*args, **kwargs)
        except BaseException as exc:
            ok, value = False, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=run, name="sdk-under-test", daemon=True).start()
    return await asyncio.wait_for(done, SDK_LIMIT_S)


@pytest.fixture
async def fake() -> AsyncIterator[FakeBraintrust]:
    async with FakeBraintrust(api_key=API_KEY) as planes:
        yield planes


@pytest.fixture
def sdk(fake: FakeBraintrust, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh SDK global state, pointed at the fake, with no stray proxies or Braintrust settings."""
    for name in (
        "BRAINTRUST_API_KEY",
        "BRAINTRUST_API_URL",
        "BRAINTRUST_PROXY_URL",
        "BRAINTRUST_ORG_NAME",
        "BRAINTRUST_APP_PUBLIC_URL",
        "BRAINTRUST_SYNC_FLUSH",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("BRAINTRUST_APP_URL", fake.control_url)
    monkeypatch.setenv("BRAINTRUST_DISABLE_ATEXIT_FLUSH", "true")
    monkeypatch.setenv("BRAINTRUST_NUM_RETRIES", "0")  # a failed /logs3 shows at once, without backoff sleeps
    monkeypatch.setenv("BRAINTRUST_HTTP_TIMEOUT", "20")
    # The background logger reads the environment when the state creates it: start from a new state.
    bt_logger._internal_reset_global_state()
    yield
    bt_logger._internal_reset_global_state()


def assert_clean(fake: FakeBraintrust) -> None:
    """Every request carried the key and was one the fake understands."""
    for plane in (fake.control, fake.data):
        assert plane.failures() == [], [(r.method, r.path, r.status) for r in plane.failures()]
        assert {r.bearer for r in plane.requests} <= {API_KEY}, plane.name


def templated(calls: list[tuple[str, str]], ids: dict[str, str]) -> set[tuple[str, str]]:
    out = set()
    for method, path in calls:
        templ = path
        for oid, name in ids.items():
            templ = templ.replace(oid, name)
        out.add((method, templ))
    return out


async def test_login_response_points_at_the_data_plane(fake: FakeBraintrust) -> None:
    async with aiohttp.ClientSession() as client:
        url = f"{fake.control_url}/api/apikey/login"
        async with client.post(url, headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
            assert resp.status == 200
            body: dict[str, Any] = await resp.json()
        async with client.post(url) as anonymous:
            assert anonymous.status == 401
        async with client.post(url, headers={"Authorization": "Bearer sk-other"}) as wrong:
            assert wrong.status == 401

    (org,) = body["org_info"]
    assert org["name"] == "acme" and org["id"] == fake.store.org_id
    assert org["api_url"] == org["proxy_url"] == fake.data_url
    assert org["app_url"] == fake.control_url  # the control plane's own URL, for a rewrite to find
    assert {"realtime_url", "git_metadata", "is_universal_api"} <= org.keys()
    assert [(r.path, r.status, r.bearer) for r in fake.control.requests] == [
        ("/api/apikey/login", 200, API_KEY),
        ("/api/apikey/login", 401, None),
        ("/api/apikey/login", 401, "sk-other"),
    ]
    assert fake.data.requests == []


async def test_sdk_flow_against_the_fake(fake: FakeBraintrust, sdk: None) -> None:
    result = await in_thread(run_sdk_flow, fake.control_url, API_KEY)

    # What the SDK saw: the login response's data plane, its own rows, its scores, links on the app URL.
    assert result.api_url == fake.data_url
    assert result.proxy_url == fake.data_url
    assert result.rows == [("a", "b"), ("c", "d")]
    assert result.scores == {"accuracy": 1.0}
    assert result.summary_url == f"{fake.control_url}/app/acme/p/proj/experiments/exp1"

    store = fake.store
    experiment = store.experiment_named("exp1")
    dataset = store.dataset_named("ds1")
    assert experiment is not None and dataset is not None
    assert experiment["project_id"] == dataset["project_id"] == store.project("proj")["id"]
    logged = store.rows_of("experiment", experiment["id"])
    assert sorted((r["input"], r["output"]) for r in logged if "scores" in r) == [(0, 0), (1, 2), (2, 4)]
    (step,) = [r for r in logged if r["span_attributes"]["name"] == "step"]
    assert (step["input"], step["output"]) == ("q", "a")
    assert sorted((r["input"], r["expected"]) for r in store.rows_of("dataset", dataset["id"])) == result.rows

    link = urlsplit(result.permalink)
    assert f"{link.scheme}://{link.netloc}{link.path}" == f"{fake.control_url}/app/acme/object"
    assert parse_qs(link.query) == {
        "object_type": ["experiment"],
        "object_id": [experiment["id"]],
        "id": [step["id"]],
    }

    # Where each call went: only the login on the control plane, everything else on the data plane.
    assert fake.control.calls() == [("POST", "/api/apikey/login")]
    ids = {experiment["id"]: "{experiment_id}", dataset["id"]: "{dataset_id}"}
    assert templated(fake.data.calls(), ids) == {
        ("POST", "/v1/project"),
        ("POST", "/v1/experiment"),
        ("GET", "/version"),
        ("POST", "/logs3"),
        ("GET", "/v1/experiment/{experiment_id}/summarize"),
        ("POST", "/v1/dataset"),
        ("POST", "/v1/dataset/{dataset_id}/fetch"),
    }
    assert_clean(fake)


async def test_sdk_login_with_a_wrong_key_fails(fake: FakeBraintrust, sdk: None) -> None:
    with pytest.raises(ValueError, match="Invalid API key"):
        await in_thread(braintrust.login, api_key="sk-wrong", app_url=fake.control_url, force_login=True)
    assert [(r.path, r.status) for r in fake.control.requests] == [("/api/apikey/login", 401)]
    assert fake.data.requests == []


def _dataset_edits(app_url: str) -> dict[str, Any]:
    braintrust.login(api_key=API_KEY, app_url=app_url, force_login=True)
    dataset = braintrust.init_dataset(project="proj", name="edits")
    keep = dataset.insert(input="keep", expected=1, metadata={"k": "v"})
    change = dataset.insert(input="change", expected=2, tags=["old"])
    gone = dataset.insert(input="gone", expected=3)
    dataset.flush()
    dataset.update(change, expected=20, metadata={"m": 1})
    dataset.delete(gone)
    dataset.flush()
    fetched = {row["id"]: row for row in dataset}
    summary = dataset.summarize()
    # The same rows, read back by a new handle through the BTQL object fetcher.
    via_btql = braintrust.init_dataset(project="proj", name="edits", _internal_btql={"limit": 10})
    return {
        "ids": (keep, change, gone),
        "fetched": fetched,
        "btql": {row["id"]: row for row in via_btql.fetch()},
        "total": summary.data_summary.total_records if summary.data_summary else None,
    }


async def test_sdk_dataset_upsert_merge_and_delete(fake: FakeBraintrust, sdk: None) -> None:
    out = await in_thread(_dataset_edits, fake.control_url)
    keep, change, _gone = out["ids"]
    fetched = out["fetched"]
    assert set(fetched) == {keep, change}
    assert (fetched[keep]["input"], fetched[keep]["expected"], fetched[keep]["metadata"]) == (
        "keep",
        1,
        {"k": "v"},
    )
    merged = fetched[change]
    assert (merged["input"], merged["expected"], merged["tags"], merged["metadata"]) == (
        "change",
        20,
        ["old"],
        {"m": 1},
    )
    assert merged["_xact_id"] > fetched[keep]["_xact_id"]
    assert {k: (v["input"], v["expected"]) for k, v in out["btql"].items()} == {
        keep: ("keep", 1),
        change: ("change", 20),
    }
    assert out["total"] == 2
    assert ("POST", "/btql") in fake.data.calls()
    assert_clean(fake)


def _read_experiment_back(app_url: str) -> list[tuple[Any, Any]]:
    braintrust.login(api_key=API_KEY, app_url=app_url, force_login=True)
    experiment = braintrust.init(project="proj", experiment="readback")
    for i in range(3):
        experiment.log(input=i, output=-i, scores={"s": i / 2})
    experiment.flush()
    readonly = braintrust.init(project="proj", experiment="readback", open=True)
    return sorted((row["input"], row["output"]) for row in readonly.fetch())


async def test_sdk_reads_an_experiment_back(fake: FakeBraintrust, sdk: None) -> None:
    rows = await in_thread(_read_experiment_back, fake.control_url)
    assert rows == [(0, 0), (1, -1), (2, -2)]
    experiment = fake.store.experiment_named("readback")
    assert experiment is not None
    calls = templated(fake.data.calls(), {experiment["id"]: "{id}"})
    assert {("GET", "/v1/experiment"), ("POST", "/v1/experiment/{id}/fetch")} <= calls
    assert_clean(fake)


async def test_fake_records_what_it_does_not_understand(fake: FakeBraintrust) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(headers=auth) as client:
        async with client.post(f"{fake.data_url}/v1/nothing-here", json={}) as resp:
            assert resp.status == 404
        async with client.post(f"{fake.data_url}/logs3", data=b"not json") as resp:
            assert resp.status == 400
    async with aiohttp.ClientSession() as browser:  # the webapp's pages: a browser sends no API key
        async with browser.get(
            f"{fake.control_url}/app/acme/object?id=1", headers={"Accept": "text/html"}
        ) as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
    assert [(r.method, r.path, r.status) for r in fake.data.failures()] == [
        ("POST", "/v1/nothing-here", 404),
        ("POST", "/logs3", 400),
    ]
    assert fake.data.requests[1].body == b"not json"
    assert [(r.path, r.query) for r in fake.control.requests] == [("/app/acme/object", "id=1")]


@pytest.mark.parametrize("method", ["PUT", "POST"])
async def test_sdk_sends_a_batch_over_the_limit_through_the_object_store(sdk: None, method: str) -> None:
    async with FakeBraintrust(
        api_key=API_KEY, logs3_payload_max_bytes=64 * 1024, store_host=STORE, upload_method=method
    ) as fake:
        out = await in_thread(log_large_batch, fake.control_url, API_KEY)
        experiment = fake.store.experiment_named("big")
        assert experiment is not None
        rows = fake.store.rows_of("experiment", experiment["id"])

    # Each big row went to the store by signed PUT, then /logs3 named its key; the small one went inline.
    assert out["overflow_uploads"] == 3
    assert sorted((r["input"], len(r["output"])) for r in rows) == [
        ("big-0", 96 * 1024),
        ("big-1", 96 * 1024),
        ("big-2", 96 * 1024),
        ("small", 1),
    ]
    assert [r.method for r in fake.objects.requests] == [method] * 3
    assert len(fake.uploads) == 3
    assert fake.data.calls().count(("POST", "/logs3/overflow")) == 3
    assert_clean(fake)


async def test_object_store_refuses_an_altered_signed_url_or_form() -> None:
    async with FakeBraintrust(store_host=STORE) as fake:
        url = fake.signed_url("k")
        form = fake.signed_form("f")
        async with aiohttp.ClientSession() as client:
            async with client.put(url.replace("/bucket/k", "/bucket/other"), data=b"x") as resp:
                assert resp.status == 403
            async with client.put(url, data=b"ok") as resp:
                assert resp.status == 200
            for change, status in (({"x-amz-signature": "0" * 64}, 403), ({"key": "other"}, 400), ({}, 204)):
                upload = aiohttp.FormData({**form["fields"], **change})
                upload.add_field("file", b"form ok", filename="logs3.json", content_type="application/json")
                async with client.post(form["signedUrl"], data=upload) as resp:
                    assert resp.status == status, change
    assert fake.uploads == {"k": b"ok", "f": b"form ok"}
