"""`bt-gateway explain --cases FILE`: a policy pinned in CI, as requests and the outcome each must get.

The file is a YAML list; each item is one case (like Envoy's router check tool):

    - url: /v1/project          # required: as `explain` takes it (/path, http(s)://host/path, CONNECT h:p)
      method: GET               # default GET
      token: sk-test            # default: no token (never the environment's: CI must not depend on it)
      headers: ["X-Extra: 1"]   # 'Name: value' strings
      client_ip: 10.0.0.7       # default 127.0.0.1
      expect: refuse            # forward | refuse | redirect
      code: egress_denied       # with refuse, the error code, the status, or both
      status: 403
      route: app                # optional: the route the request must take
      name: partners are denied # optional, printed with a mismatch

Cases never resolve names (no outcome depends on DNS) and count nothing, so one token may repeat freely;
a rate limit already used up in a shared store does show.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.config.yaml_source import Yaml12Loader
from gateway.explain import ExplainRequest, ExplainUsageError, Report, explain_request

OUTCOMES = ("forward", "refuse", "redirect")
KEYS = frozenset(
    {"url", "method", "token", "headers", "client_ip", "expect", "code", "status", "route", "name"}
)


class CasesError(Exception):
    """The cases file cannot be used: one line per problem, `FILE:LINE: cases[i].key: message`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Case:
    """One request and what must become of it; `line` is where its item starts in the file."""

    line: int
    request: ExplainRequest
    expect: str
    code: str | None = None
    status: int | None = None
    route: str | None = None
    name: str | None = None

    def mismatch(self, report: Report) -> str | None:
        """Why the report differs from what this case expects, or None when it matches."""
        wanted = _describe(self.expect, self.code, self.status, self.route)
        got = _describe(report["outcome"], report["code"], report["status"], report["route"])
        matches = (
            report["outcome"] == self.expect
            and self.code in (None, report["code"])
            and self.status in (None, report["status"])
            and self.route in (None, report["route"])
        )
        if matches:
            return None
        label = f" ({self.name})" if self.name else ""
        return f"{self.request.method} {self.request.target}{label}: expected {wanted}, got {got}"


def _describe(outcome: str, code: str | None, status: int | None, route: str | None) -> str:
    words = [outcome, *(str(v) for v in (status, code) if v is not None)]
    return " ".join(words) + (f" on route {route}" if route is not None else "")


def load_cases(path: Path) -> list[Case]:
    """Every case of the file; raise CasesError naming each bad item and key by its line."""
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CasesError([f"{where}: cannot read the cases file: {reason}"]) from None
    loader = Yaml12Loader(text)
    try:
        root = loader.get_single_node()
        items = root.value if isinstance(root, yaml.SequenceNode) else None
        if items is None:
            raise CasesError([f"{where}:1: cases: the file must be a YAML list of cases"])
        cases, problems = [], []
        for index, node in enumerate(items):
            line = node.start_mark.line + 1
            try:
                cases.append(_case(line, loader.construct_object(node, deep=True)))
            except CasesError as exc:
                problems.append(f"{where}:{line}: cases[{index}]{exc}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise CasesError([f"{where}:{line}: cases: invalid YAML: {getattr(exc, 'problem', exc)}"]) from None
    finally:
        loader.dispose()
    if problems:
        raise CasesError(problems)
    return cases


def _case(line: int, item: Any) -> Case:
    """One item; a problem is raised as `.key: message` (the caller adds where)."""
    if not isinstance(item, dict):
        raise CasesError([": a case is a mapping with at least url and expect"])
    unknown = sorted(set(map(str, item)) - KEYS)
    if unknown:
        raise CasesError([f".{unknown[0]}: unknown key; known: {', '.join(sorted(KEYS))}"])
    for key in ("url", "method", "token", "client_ip", "code", "route", "name"):
        if item.get(key) is not None and not isinstance(item[key], str):
            raise CasesError([f".{key}: must be a string"])
    if not isinstance(item.get("url"), str):
        raise CasesError([".url: required: /path, http(s)://host/path or CONNECT host:port"])
    expect, status, headers = item.get("expect"), item.get("status"), item.get("headers", [])
    if expect not in OUTCOMES:
        raise CasesError([f".expect: must be one of {', '.join(OUTCOMES)}, got {expect!r}"])
    if status is not None and (not isinstance(status, int) or isinstance(status, bool)):
        raise CasesError([".status: must be an HTTP status code such as 403"])
    if expect == "refuse" and item.get("code") is None and status is None:
        raise CasesError([".expect: refuse needs the code, the status, or both"])
    if not isinstance(headers, list) or not all(isinstance(h, str) for h in headers):
        raise CasesError([".headers: must be a list of 'Name: value' strings"])
    try:
        request = explain_request(
            [item["url"]],
            method=item.get("method"),
            token=item.get("token"),
            headers=headers,
            client_ip=item.get("client_ip") or "127.0.0.1",
            resolve=False,
        )
    except ExplainUsageError as exc:
        raise CasesError([f": {exc}"]) from None
    return Case(line, request, expect, item.get("code"), status, item.get("route"), item.get("name"))


def mismatches(path: Path, cases: list[Case], reports: list[Report]) -> list[str]:
    """One line per case whose report differs: `FILE:LINE: METHOD URL: expected ..., got ...`."""
    found = (case.mismatch(report) for case, report in zip(cases, reports, strict=True))
    return [f"{path}:{case.line}: {why}" for case, why in zip(cases, found, strict=True) if why is not None]
