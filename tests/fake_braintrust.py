"""A fake Braintrust control plane and data plane: two in-memory aiohttp apps for driving the real SDK.

Modelled on what the Python SDK 0.47.0 and the TypeScript SDK 3.35.0 call (read from their sources and
checked by tests/integration/test_fake_braintrust.py and tests/integration/test_js_sdk.py):

control plane (the app URL, `BRAINTRUST_APP_URL`)
    POST /api/apikey/login            -> {"org_info": [{id, name, api_url, proxy_url, realtime_url,
                                          git_metadata, is_universal_api, app_url}]}
    GET  /app/...                     -> a small HTML page (the webapp; permalinks point here), the one
                                         path served without the API key, as a browser asks for it
    POST /api/base_experiment/get_id  -> 400 when there is no base experiment (as the real app)
    POST /api/{project,experiment,dataset}/register -> {"project": ..., "<kind>": ...}: how the JS SDK
                                         (and older Python SDKs) create or find objects; an experiment
                                         name already taken gets a suffix unless `update` is true

data plane (`org_info[].api_url`)
    GET  /version, GET /ping
    POST /v1/project, GET /v1/project, GET /v1/project/{id}
    POST /v1/experiment, GET /v1/experiment, GET /v1/experiment/{id}
    POST /v1/experiment/{id}/fetch, GET /v1/experiment/{id}/summarize
    POST /v1/dataset, GET /v1/dataset, GET /v1/dataset/{id}
    POST /v1/dataset/{id}/fetch, GET /v1/dataset/{id}/summarize
    POST /logs3                       -> rows are merged per object the way Braintrust does (upsert,
                                         `_is_merge`, `_object_delete`) and stamped with a `_xact_id`
    POST /btql                        -> the SDK's object fetcher query (`select * from dataset('<id>')`)
    GET  /experiment-comparison2      -> the JS SDK's experiment summary: per-score averages
    GET  /dataset-summary             -> the JS SDK's dataset summary: {"total_records": n}

Every request is recorded per plane (method, path, query, headers, body, answered status), including
the ones answered 401 (no or wrong `Authorization: Bearer <key>`) and 404 (an endpoint the fake lacks),
so a test can assert the SDK only made calls the fake understands, and which hops reached which plane.

    async with FakeBraintrust(api_key="sk-...") as fake:
        fake.control_url, fake.data_url        # http://127.0.0.1:<port> each
        ... run the SDK with app_url=fake.control_url ...
        fake.control.calls()                   # [("POST", "/api/apikey/login")]
        fake.store.rows_of("dataset", dataset_id)
"""

from __future__ import annotations

import base64
import copy
import email.parser
import email.policy
import hashlib
import hmac
import itertools
import json
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDict, CIMultiDictProxy

Json = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CREATED = "2026-01-01T00:00:00.000Z"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: CIMultiDictProxy[str]
    body: bytes
    status: int

    @property
    def bearer(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None


@dataclass
class PlaneRecord:
    """What reached one plane, in arrival order."""

    name: str
    requests: list[RecordedRequest] = field(default_factory=list)

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.requests]

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    def failures(self) -> list[RecordedRequest]:
        """Requests the fake answered with a 4xx/5xx (unknown endpoint, bad auth, bad body)."""
        return [r for r in self.requests if r.status >= 400]


@dataclass
class Store:
    """Braintrust's state, in memory: projects, experiments, datasets and their merged rows."""

    org_id: str
    projects: dict[str, Json] = field(default_factory=dict)
    experiments: dict[str, Json] = field(default_factory=dict)
    datasets: dict[str, Json] = field(default_factory=dict)
    # (object_type, object_id) -> row id -> merged row, in first-insert order
    objects: dict[tuple[str, str], dict[str, Json]] = field(default_factory=dict)
    logs3_rows: list[Json] = field(default_factory=list)  # every row as received, unmerged
    _xact: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))

    def project(self, name: str) -> Json:
        for project in self.projects.values():
            if project["name"] == name:
                return project
        project = {
            "id": str(uuid.uuid4()),
            "org_id": self.org_id,
            "name": name,
            "created": CREATED,
            "deleted_at": None,
            "user_id": "user-1",
            "settings": None,
        }
        self.projects[project["id"]] = project
        return project

    def experiment_named(self, name: str, project_id: str | None = None) -> Json | None:
        return next(
            (
                e
                for e in self.experiments.values()
                if e["name"] == name and project_id in (None, e["project_id"])
            ),
            None,
        )

    def dataset_named(self, name: str, project_id: str | None = None) -> Json | None:
        return next(
            (
                d
                for d in self.datasets.values()
                if d["name"] == name and project_id in (None, d["project_id"])
            ),
            None,
        )

    def rows_of(self, object_type: str, object_id: str) -> list[Json]:
        return [copy.deepcopy(row) for row in self.objects.get((object_type, object_id), {}).values()]

    def next_xact(self) -> str:
        return f"{next(self._xact):020d}"

    def apply_row(self, row: Json, xact_id: str) -> str | None:
        """Upsert one /logs3 row into its object; answers the row id (None for rows it cannot place)."""
        key = _object_of(row)
        row_id = row.get("id")
        if key is None or not isinstance(row_id, str):
            return None
        rows = self.objects.setdefault(key, {})
        if row.get("_object_delete") is True:
            rows.pop(row_id, None)
            return row_id
        incoming = {k: copy.deepcopy(v) for k, v in row.items() if k != "_is_merge"}
        existing = rows.get(row_id)
        if row.get("_is_merge") is True and existing is not None:
            merged = _deep_merge(existing, incoming)
        else:
            merged = incoming
            merged.setdefault("created", CREATED)
        merged["_xact_id"] = xact_id
        if key[0] == "dataset":
            merged.setdefault("span_id", row_id)
            merged.setdefault("root_span_id", row_id)
            merged.setdefault("project_id", self.datasets.get(key[1], {}).get("project_id"))
        rows[row_id] = merged
        return row_id


def _object_of(row: Mapping[str, Any]) -> tuple[str, str] | None:
    if isinstance(row.get("experiment_id"), str):
        return ("experiment", row["experiment_id"])
    if isinstance(row.get("dataset_id"), str):
        return ("dataset", row["dataset_id"])
    if isinstance(row.get("prompt_session_id"), str):
        return ("prompt_session", row["prompt_session_id"])
    if isinstance(row.get("project_id"), str) and row.get("log_id") == "g":
        return ("project_logs", row["project_id"])
    return None


def _deep_merge(base: Json, update: Mapping[str, Any]) -> Json:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _page(rows: list[Json], body: Mapping[str, Any]) -> Json:
    """The fetch endpoints' cursor pagination: the cursor is an offset, as text."""
    limit = body.get("limit")
    limit = limit if isinstance(limit, int) and limit > 0 else len(rows) or 1
    start = int(body["cursor"]) if isinstance(body.get("cursor"), str) and body["cursor"].isdigit() else 0
    chunk = rows[start : start + limit]
    cursor = str(start + limit) if start + limit < len(rows) else None
    return {"events": chunk, "cursor": cursor}


def _not_found(what: str) -> web.Response:
    return web.json_response({"error": f"{what} not found"}, status=404)


async def _json_body(request: web.Request) -> Json:
    if not request.body_exists:
        return {}
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": "expected a JSON object"}', content_type="application/json")
    return body


def _form_fields(content_type: str, body: bytes) -> dict[str, bytes]:
    """A multipart/form-data body's fields by name (the recorder has already read the stream)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    fields: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if isinstance(name, str) and isinstance(payload, bytes):
            fields[name] = payload
    return fields


class FakeBraintrust:
    """Both planes; `start()`/`stop()` or `async with`. URLs are known once started."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        org_name: str = "acme",
        org_id: str = "org-00000000-fake",
        host: str = "127.0.0.1",
        control_host: str | None = None,
        data_host: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        git_metadata: Mapping[str, Any] | None = None,
        org_extra: Mapping[str, Any] | None = None,
        logs3_payload_max_bytes: int = 64 * 1024 * 1024,
        store_host: str | None = None,
        upload_method: Literal["PUT", "POST"] = "PUT",
        store_tls: ssl.SSLContext | None = None,
    ) -> None:
        """`api_key`: if set, any request without `Authorization: Bearer <api_key>` gets 401.

        `host` is where both planes listen; `control_host`/`data_host` are the names their URLs are
        written with (default `host`), e.g. names only a gateway can resolve. `org_extra` is merged into
        the login response's org entry. `logs3_payload_max_bytes` is what `/version` advertises: a batch
        over it goes to `/logs3/overflow`, whose signed URLs point at an object store listening on
        `store_host` (started only when it is given), as S3 would: with `upload_method` PUT, a PUT whose
        query is signed; with POST, a multipart form whose fields carry a signed policy (S3's POST).
        `store_tls`: the object store speaks https with it (the relay relays https only).
        """
        self.api_key = api_key
        self.org_name = org_name
        self.host = host
        self.control_host = control_host or host
        self.data_host = data_host or host
        self.ssl_context = ssl_context
        self.git_metadata = dict(git_metadata) if git_metadata is not None else None
        self.org_extra = dict(org_extra or {})
        self.store = Store(org_id=org_id)
        self.control = PlaneRecord("control")
        self.data = PlaneRecord("data")
        self.objects = PlaneRecord("object store")
        self.control_port = 0
        self.data_port = 0
        self.logs3_payload_max_bytes = logs3_payload_max_bytes
        self.store_host = store_host
        self.store_port = 0
        self.store_tls = store_tls
        self.upload_method = upload_method
        self.uploads: dict[str, bytes] = {}  # object key -> what the object store holds
        self._signing_key = uuid.uuid4().bytes
        self._runners: list[web.AppRunner] = []

    # ---------------------------------------------------------------- lifecycle

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    @property
    def control_url(self) -> str:
        self._require_started()
        return f"{self.scheme}://{self.control_host}:{self.control_port}"

    @property
    def data_url(self) -> str:
        self._require_started()
        return f"{self.scheme}://{self.data_host}:{self.data_port}"

    def _require_started(self) -> None:
        if not self._runners:
            raise RuntimeError("FakeBraintrust is not started")

    async def start(self) -> None:
        if self.store_host is not None:
            self.store_port = await self._serve(self._object_store_app(), self.store_host, self.store_tls)
        self.data_port = await self._serve(self._data_app())
        self.control_port = await self._serve(self._control_app())

    async def stop(self) -> None:
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _serve(
        self, app: web.Application, host: str | None = None, tls: ssl.SSLContext | None = None
    ) -> int:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handler_cancellation=True)
        await runner.setup()
        self._runners.append(runner)
        ssl_context = self.ssl_context if host is None else tls
        site = web.TCPSite(runner, host or self.host, 0, ssl_context=ssl_context)
        await site.start()
        port: int = runner.addresses[0][1]
        return port

    def gateway_config(self, *extra_allow: str, **data_route: Any) -> dict[str, Any]:
        """A gateway in front of these planes, laid out as shipped: `app` to the control plane and an
        advertised `data` route to the data plane (`data_route` adds keys to it)."""
        return {
            "allowlist": [f"127.0.0.1:{self.control_port}", f"127.0.0.1:{self.data_port}", *extra_allow],
            "routes": [
                {"name": "app", "prefix": "/", "upstream": self.control_url},
                {
                    "name": "data",
                    "prefix": "/data-plane",
                    "upstream": self.data_url,
                    "advertise": True,
                    **data_route,
                },
            ],
        }

    # ---------------------------------------------------------------- shared plumbing

    def _recorder(self, plane: PlaneRecord, *, keyed: bool = True) -> Middleware:
        """Record every request; with `keyed`, refuse those without the API key, as Braintrust does."""

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            body = await request.read()
            status = 500  # unless the handler answers
            try:
                if (
                    keyed
                    and self.api_key is not None
                    and not request.path.startswith("/app/")
                    and request.headers.get("Authorization") != (f"Bearer {self.api_key}")
                ):
                    status = 401
                    return web.json_response({"error": "Invalid API key (fake braintrust)"}, status=401)
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                plane.requests.append(
                    RecordedRequest(
                        method=request.method,
                        path=request.path,
                        query=request.query_string,
                        headers=CIMultiDictProxy(CIMultiDict(request.headers)),
                        body=body,
                        status=status,
                    )
                )

        return middleware

    @staticmethod
    async def _unknown(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": f"the fake Braintrust has no {request.method} {request.path}"}, status=404
        )

    # ---------------------------------------------------------------- object store

    @property
    def store_url(self) -> str:
        return f"{'https' if self.store_tls is not None else 'http'}://{self.store_host}:{self.store_port}"

    def signed_url(self, key: str) -> str:
        """A presigned PUT URL for `key`: the store checks the signature over method, path and query."""
        query = f"X-Amz-Date={time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}&X-Amz-Expires=900"
        path = f"/bucket/{key}"
        signature = self._sign(path, query)
        return f"{self.store_url}{path}?{query}&X-Amz-Signature={signature}"

    def signed_form(self, key: str) -> Json:
        """A presigned POST for `key`: the bucket's URL and form fields whose policy names the key."""
        policy = base64.b64encode(json.dumps({"key": key, "expires_in": 900}).encode()).decode()
        fields = {"key": key, "policy": policy, "x-amz-signature": self._sign("/bucket", policy, "POST")}
        return {"signedUrl": f"{self.store_url}/bucket", "fields": fields}

    def _sign(self, path: str, query: str, method: str = "PUT") -> str:
        return hmac.new(self._signing_key, f"{method}\n{path}\n{query}".encode(), hashlib.sha256).hexdigest()

    def _object_store_app(self) -> web.Application:
        async def put(request: web.Request) -> web.Response:
            query, _, signature = request.query_string.rpartition("&X-Amz-Signature=")
            if not hmac.compare_digest(signature, self._sign(request.path, query)):
                return web.Response(status=403, text="SignatureDoesNotMatch")
            self.uploads[request.path.removeprefix("/bucket/")] = await request.read()
            return web.Response(status=200, headers={"ETag": '"fake"'})

        async def post(request: web.Request) -> web.Response:
            """S3's POST upload: the form's policy is signed and names the key; the file is the object."""
            form = _form_fields(request.headers.get("Content-Type", ""), await request.read())
            policy = form.get("policy", b"").decode()
            signature = form.get("x-amz-signature", b"").decode()
            if not hmac.compare_digest(signature, self._sign(request.path, policy, "POST")):
                return web.Response(status=403, text="SignatureDoesNotMatch")
            key = json.loads(base64.b64decode(policy))["key"]
            if form.get("key", b"").decode() != key or "file" not in form:
                return web.Response(status=400, text="InvalidPolicyDocument")
            self.uploads[key] = form["file"]
            return web.Response(status=204)

        app = web.Application(middlewares=[self._recorder(self.objects, keyed=False)], client_max_size=2**30)
        app.router.add_put("/bucket/{key:.+}", put)
        app.router.add_post("/bucket", post)
        return app

    # ---------------------------------------------------------------- control plane

    def login_response(self) -> Json:
        """What POST /api/apikey/login answers: the data plane's real URL as api_url and proxy_url."""
        org: Json = {
            "id": self.store.org_id,
            "name": self.org_name,
            "api_url": self.data_url,
            "proxy_url": self.data_url,
            "realtime_url": None,
            "git_metadata": self.git_metadata,
            "is_universal_api": True,
            # Not read by the SDK: the control plane's own URL, for app-URL -> public_url rewriting.
            "app_url": self.control_url,
            **self.org_extra,
        }
        return {"org_info": [org]}

    def _control_app(self) -> web.Application:
        store = self.store

        async def login(_: web.Request) -> web.Response:
            return web.json_response(self.login_response())

        async def webapp(request: web.Request) -> web.Response:
            html = f"<!doctype html><title>Braintrust (fake)</title><p>{request.path}</p>"
            return web.Response(text=html, content_type="text/html")

        async def base_experiment(request: web.Request) -> web.Response:
            body = await _json_body(request)
            experiment = store.experiments.get(str(body.get("id")))
            base = store.experiments.get(str(experiment.get("base_exp_id"))) if experiment else None
            if base is None:
                return web.json_response({"error": "no base experiment"}, status=400)
            return web.json_response({"base_exp_id": base["id"], "base_exp_name": base["name"]})

        async def register_project(request: web.Request) -> web.Response:
            body = await _json_body(request)
            return web.json_response({"project": store.project(str(body.get("project_name") or "Global"))})

        async def register_object(request: web.Request) -> web.Response:
            kind = request.match_info["kind"]
            body = await _json_body(request)
            project = (
                store.projects.get(str(body.get("project_id")))
                if body.get("project_id")
                else store.project(str(body.get("project_name") or "Global"))
            )
            if project is None:
                return _not_found("project")
            name = body.get(f"{kind}_name") or body.get("name")
            fields = {**body, "project_id": project["id"], "name": name}
            if kind == "experiment":
                # Registering an experiment under a taken name makes a new one unless `update` is set.
                fields["ensure_new"] = not body.get("update")
            obj = self._create_object(kind, fields)
            return web.json_response({"project": project, kind: obj})

        app = web.Application(middlewares=[self._recorder(self.control)])
        app.router.add_post("/api/apikey/login", login)
        app.router.add_get("/app/{tail:.*}", webapp)
        app.router.add_post("/api/base_experiment/get_id", base_experiment)
        app.router.add_post("/api/project/register", register_project)
        app.router.add_post("/api/{kind:experiment|dataset}/register", register_object)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        return app

    # ---------------------------------------------------------------- data plane

    def _create_object(self, kind: str, body: Mapping[str, Any]) -> Json:
        """POST /v1/experiment and /v1/dataset: datasets are get-or-create by name; experiments are too,
        unless `ensure_new` asks for a fresh one (then the name gets a suffix, as Braintrust does)."""
        store = self.store
        table = store.experiments if kind == "experiment" else store.datasets
        project_id = str(body["project_id"])
        name = body.get("name")
        existing = next(
            (
                o
                for o in table.values()
                if name is not None and o["name"] == name and o["project_id"] == project_id
            ),
            None,
        )
        if existing is not None and not (kind == "experiment" and body.get("ensure_new")):
            return existing
        if name is None:
            name = f"{kind}-{len(table) + 1}"
        elif existing is not None:
            name = f"{name}-{uuid.uuid4().hex[:8]}"
        obj: Json = {
            "id": str(uuid.uuid4()),
            "project_id": project_id,
            "name": name,
            "description": body.get("description"),
            "created": CREATED,
            "deleted_at": None,
            "user_id": "user-1",
            "metadata": body.get("metadata"),
        }
        if kind == "experiment":
            obj |= {
                "repo_info": body.get("repo_info"),
                "commit": None,
                "base_exp_id": body.get("base_exp_id"),
                "dataset_id": body.get("dataset_id"),
                "dataset_version": body.get("dataset_version"),
                "public": bool(body.get("public", False)),
                "tags": body.get("tags"),
            }
        table[obj["id"]] = obj
        return obj

    def _summarize_experiment(self, experiment: Json) -> Json:
        project = self.store.projects.get(experiment["project_id"], {})
        project_url = f"{self.control_url}/app/{self.org_name}/p/{project.get('name')}"
        return {
            "project_name": project.get("name"),
            "experiment_name": experiment["name"],
            "project_url": project_url,
            "experiment_url": f"{project_url}/experiments/{experiment['name']}",
            "comparison_experiment_name": None,
            # Exactly ScoreSummary's fields: the SDK builds ScoreSummary(**item).
            "scores": {
                name: {"name": name, "score": score, "diff": None, "improvements": None, "regressions": None}
                for name, score in self._score_averages(experiment["id"]).items()
            },
            "metrics": {},
        }

    def _score_averages(self, experiment_id: str) -> dict[str, float]:
        scored: dict[str, list[float]] = {}
        for row in self.store.rows_of("experiment", experiment_id):
            for name, value in (row.get("scores") or {}).items():
                if isinstance(value, int | float):
                    scored.setdefault(name, []).append(float(value))
        return {name: sum(values) / len(values) for name, values in sorted(scored.items())}

    def _data_app(self) -> web.Application:
        store = self.store

        async def version(_: web.Request) -> web.Response:
            limit = self.logs3_payload_max_bytes
            return web.json_response({"version": "fake-0.47.0", "logs3_payload_max_bytes": limit})

        async def overflow(request: web.Request) -> web.Response:
            """An upload slot for a batch over the limit: a signed URL on the object store (S3's shape)."""
            if self.store_host is None:
                return await self._unknown(request)
            key = f"logs3-overflow/{uuid.uuid4()}"
            if self.upload_method == "POST":
                return web.json_response({"method": "POST", "key": key, **self.signed_form(key)})
            return web.json_response(
                {
                    "method": "PUT",
                    "signedUrl": self.signed_url(key),
                    "headers": {"Content-Type": "application/json"},
                    "key": key,
                }
            )

        async def ping(_: web.Request) -> web.Response:
            return web.json_response({"id": "user-1", "email": "user@example.com"})

        async def create_project(request: web.Request) -> web.Response:
            body = await _json_body(request)
            return web.json_response(store.project(str(body.get("name") or "Global")))

        async def list_projects(request: web.Request) -> web.Response:
            name = request.query.get("project_name")
            found = [p for p in store.projects.values() if name in (None, p["name"])]
            return web.json_response({"objects": found})

        async def get_project(request: web.Request) -> web.Response:
            project = store.projects.get(request.match_info["oid"])
            return web.json_response(project) if project else _not_found("project")

        async def create_object(request: web.Request) -> web.Response:
            body = await _json_body(request)
            if str(body.get("project_id")) not in store.projects:
                return _not_found("project")
            return web.json_response(self._create_object(request.match_info["kind"], body))

        def table_of(request: web.Request) -> dict[str, Json]:
            return store.experiments if request.match_info["kind"] == "experiment" else store.datasets

        async def list_objects(request: web.Request) -> web.Response:
            kind = request.match_info["kind"]
            query = request.query
            project_ids = {
                p["id"]
                for p in store.projects.values()
                if query.get("project_id") in (None, p["id"])
                and query.get("project_name") in (None, p["name"])
            }
            name = query.get(f"{kind}_name")
            found = [
                o
                for o in table_of(request).values()
                if o["project_id"] in project_ids and name in (None, o["name"])
            ]
            return web.json_response({"objects": found})

        async def get_object(request: web.Request) -> web.Response:
            obj = table_of(request).get(request.match_info["oid"])
            return web.json_response(obj) if obj else _not_found(request.match_info["kind"])

        async def fetch(request: web.Request) -> web.Response:
            kind, oid = request.match_info["kind"], request.match_info["oid"]
            if oid not in table_of(request):
                return _not_found(kind)
            body = await _json_body(request)
            return web.json_response(_page(store.rows_of(kind, oid), body))

        async def summarize(request: web.Request) -> web.Response:
            kind, oid = request.match_info["kind"], request.match_info["oid"]
            obj = table_of(request).get(oid)
            if obj is None:
                return _not_found(kind)
            if kind == "experiment":
                return web.json_response(self._summarize_experiment(obj))
            project = store.projects.get(obj["project_id"], {})
            project_url = f"{self.control_url}/app/{self.org_name}/p/{project.get('name')}"
            return web.json_response(
                {
                    "project_name": project.get("name"),
                    "dataset_name": obj["name"],
                    "project_url": project_url,
                    "dataset_url": f"{project_url}/datasets/{obj['name']}",
                    # Exactly DataSummary's fields (less new_records, which the SDK counts itself).
                    "data_summary": {"total_records": len(store.rows_of("dataset", oid))},
                }
            )

        async def logs3(request: web.Request) -> web.Response:
            body = await _json_body(request)
            rows = body.get("rows")
            if isinstance(rows, dict) and rows.get("type") == "logs3_overflow":  # the batch is in the store
                uploaded = self.uploads.get(str(rows.get("key")))
                if uploaded is None:
                    return web.json_response({"error": "no such overflow upload"}, status=400)
                rows = json.loads(uploaded).get("rows")
            if not isinstance(rows, list):
                return web.json_response({"error": "logs3 rows must be a list"}, status=400)
            xact_id = store.next_xact()
            ids = []
            for row in rows:
                if isinstance(row, dict):
                    store.logs3_rows.append(copy.deepcopy(row))
                    ids.append(store.apply_row(row, xact_id))
            return web.json_response({"ids": ids, "xact_id": xact_id})

        async def btql(request: web.Request) -> web.Response:
            body = await _json_body(request)
            query = body.get("query")
            if not isinstance(query, dict):
                query = {}
            try:
                source = query["from"]
                kind = source["name"]["name"][0]
                oid = source["args"][0]["value"]
            except (KeyError, IndexError, TypeError):
                return web.json_response(
                    {"error": "the fake only answers `select * from <object>('<id>')`"}, status=400
                )
            page = _page(store.rows_of(str(kind), str(oid)), query)
            return web.json_response({"data": page["events"], "cursor": page["cursor"], "schema": {}})

        async def experiment_comparison(request: web.Request) -> web.Response:
            """The JS SDK's `Experiment.summarize`: score averages of `experiment_id`, with a `diff`
            against `base_experiment_id` when given (the fake matches no rows: 0 improvements and
            regressions)."""
            experiment = store.experiments.get(request.query.get("experiment_id", ""))
            if experiment is None:
                return _not_found("experiment")
            base_id = request.query.get("base_experiment_id")
            if base_id is not None and base_id not in store.experiments:
                return _not_found("base experiment")
            base = self._score_averages(base_id) if base_id else {}
            scores = {}
            for name, score in self._score_averages(experiment["id"]).items():
                scores[name] = {"name": name, "score": score, "improvements": 0, "regressions": 0}
                if name in base:
                    scores[name]["diff"] = score - base[name]
            return web.json_response({"scores": scores, "metrics": {}})

        async def dataset_summary(request: web.Request) -> web.Response:
            oid = request.query.get("dataset_id", "")
            if oid not in store.datasets:
                return _not_found("dataset")
            return web.json_response({"total_records": len(store.rows_of("dataset", oid))})

        app = web.Application(middlewares=[self._recorder(self.data)], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/version", version)
        app.router.add_get("/ping", ping)
        app.router.add_post("/v1/project", create_project)
        app.router.add_get("/v1/project", list_projects)
        app.router.add_get("/v1/project/{oid}", get_project)
        kinds = "{kind:experiment|dataset}"
        app.router.add_post(f"/v1/{kinds}", create_object)
        app.router.add_get(f"/v1/{kinds}", list_objects)
        app.router.add_get(f"/v1/{kinds}/{{oid}}", get_object)
        app.router.add_post(f"/v1/{kinds}/{{oid}}/fetch", fetch)
        app.router.add_get(f"/v1/{kinds}/{{oid}}/summarize", summarize)
        app.router.add_post("/logs3", logs3)
        app.router.add_post("/logs3/overflow", overflow)
        app.router.add_post("/btql", btql)
        app.router.add_get("/experiment-comparison2", experiment_comparison)
        app.router.add_get("/dataset-summary", dataset_summary)
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        return app
