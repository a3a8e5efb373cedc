"""The real Braintrust Python SDK's everyday flow, run in a subprocess of its own.

The SDK keeps global state and background flusher threads; a fresh process per flow keeps tests
independent and lets the test's event loop go on serving the gateway and the fake planes meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SdkFlowResult:
    api_url: str | None
    proxy_url: str | None
    summary_url: str
    scores: dict[str, float]
    rows: list[tuple[Any, Any]]
    permalink: str


def run_sdk_flow(app_url: str, api_key: str) -> SdkFlowResult:
    """login, experiment + 3 rows + a span + summarize, dataset + 2 rows + fetch; what the SDK saw."""
    import braintrust
    from braintrust.logger import _state

    braintrust.login(api_key=api_key, app_url=app_url, force_login=True)
    experiment = braintrust.init(project="proj", experiment="exp1")
    for i in range(3):
        experiment.log(input=i, output=i * 2, scores={"accuracy": 1.0})
    span = experiment.start_span(name="step")
    span.log(input="q", output="a")
    span.end()
    permalink = span.permalink()
    summary = experiment.summarize()
    dataset = braintrust.init_dataset(project="proj", name="ds1")
    dataset.insert(input="a", expected="b")
    dataset.insert(input="c", expected="d")
    dataset.flush()
    rows = sorted((row["input"], row["expected"]) for row in dataset.fetch())
    scores = {name: item.score for name, item in getattr(summary.comparison, "scores", {}).items()}
    return SdkFlowResult(
        api_url=_state.api_url,
        proxy_url=_state.proxy_url,
        summary_url=summary.experiment_url or "",
        scores=scores,
        rows=rows,
        permalink=permalink,
    )


def log_large_batch(app_url: str, api_key: str) -> dict[str, Any]:
    """One experiment, three rows of 96 KiB and one small: the big ones exceed a small server limit."""
    import braintrust

    braintrust.login(api_key=api_key, app_url=app_url, force_login=True)
    experiment = braintrust.init(project="proj", experiment="big")
    for i in range(3):
        experiment.log(input=f"big-{i}", output="x" * (96 * 1024), scores={"ok": 1.0})
    experiment.log(input="small", output="y", scores={"ok": 1.0})
    experiment.flush()
    from braintrust.logger import _state

    return {"overflow_uploads": _state.global_bg_logger()._overflow_upload_count}


def log_rows_one_by_one(app_url: str, api_key: str) -> dict[str, Any]:
    """30 rows, each flushed on its own: 30 `/logs3` requests in a burst, as a busy SDK makes."""
    import braintrust

    braintrust.login(api_key=api_key, app_url=app_url, force_login=True)
    experiment = braintrust.init(project="proj", experiment="burst")
    for i in range(30):
        experiment.log(input=i, output=i, scores={"ok": 1.0})
        experiment.flush()
    return {}


def round_trip_text(app_url: str, api_key: str, text: str) -> dict[str, Any]:
    """Insert a dataset row whose text is `text`, fetch it back: what the SDK read."""
    import braintrust

    braintrust.login(api_key=api_key, app_url=app_url, force_login=True)
    dataset = braintrust.init_dataset(project="proj", name="urls")
    dataset.insert(input=text, expected={"note": text})
    dataset.flush()
    return {"fetched": [(row["input"], row["expected"]) for row in dataset.fetch()]}


FLOWS: dict[str, Callable[..., Any]] = {
    "everyday": lambda *args: asdict(run_sdk_flow(*args)),
    "large_batch": log_large_batch,
    "rows_one_by_one": log_rows_one_by_one,
    "round_trip_text": round_trip_text,
}


async def run_flow(
    flow: str, app_url: str, api_key: str, env: dict[str, str], *args: str, limit_s: float = 120
) -> Any:
    """Run FLOWS[flow] in a new interpreter with exactly `env` added; its result comes back as JSON."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.sdk_flow",
        flow,
        app_url,
        api_key,
        *args,
        cwd=ROOT,
        env={**os.environ, **env, "BRAINTRUST_DISABLE_ATEXIT_FLUSH": "true"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise AssertionError(f"SDK flow {flow} failed ({proc.returncode}): {err.decode()[-4000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


async def run_in_subprocess(app_url: str, api_key: str, env: dict[str, str]) -> SdkFlowResult:
    """The everyday flow in its own interpreter (see `run_flow`)."""
    data = await run_flow("everyday", app_url, api_key, env)
    data["rows"] = [tuple(row) for row in data["rows"]]
    return SdkFlowResult(**data)


if __name__ == "__main__":
    result = FLOWS[sys.argv[1]](*sys.argv[2:])
    print(json.dumps(result), flush=True)
    os._exit(0)  # skip the SDK's background threads: the result is out
