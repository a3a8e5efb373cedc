"""The `bt-gateway explain` report for a person: the steps in chain order, then what the terminal step
would use. Read from the JSON-ready report (gateway/explain.py), so text and `--json` never disagree."""

from __future__ import annotations

from gateway.explain import Report


def render_text(report: Report) -> str:
    """The report for a person: the steps in chain order, then what the terminal step would use."""
    request = report["request"]
    who = f"token {request['token_fingerprint']}" if request["token_fingerprint"] else "no token"
    lines = [f"{request['method']} {request['url']}  ({who}, from {request['client_ip']})", "steps:"]
    width = max(len(step["step"]) for step in report["steps"]) if report["steps"] else 0
    for step in report["steps"]:
        line = f"  {step['step']:<{width}}  {step['verdict']}"
        if step["code"] is not None:
            line += f"  {step['status']} {step['code']} ({step['reason']}): {step['detail']}"
        lines.append(line)
    upstream = report["upstream"]
    lines.append(f"route:      {report['route'] or '-'}")
    if upstream is not None:
        where = upstream["url"] or f"tunnel to {upstream['host']}:{upstream['port']}"
        lines.append(
            f"upstream:   {where}" + (f" via {upstream['via_proxy']}" if upstream["via_proxy"] else "")
        )
    lines.append(f"resolves:   {_resolved_text(report['resolve'])}")
    lines.append(f"rate limit: {_limit_text(report['rate_limit'])}")
    lines += _rewrite_text(report["rewrite"])
    verdict = report["outcome"]
    if report["status"] is not None:
        verdict += f" {report['status']}" + (
            f" {report['code']} ({report['reason']})" if report["code"] else ""
        )
        verdict += f": {report['detail']}"
    let_go = report["would_refuse"]
    if let_go is not None:  # report mode: what enforce mode would have answered instead
        verdict += (
            f" (report mode; enforce would refuse {let_go['status']} {let_go['code']} at {let_go['step']})"
        )
    lines.append(f"verdict:    {verdict}")
    return "\n".join(lines) + "\n"


def _resolved_text(resolved: Report | None) -> str:
    if resolved is None:
        return "not resolved (--no-resolve, or no destination)"
    if resolved["by"] == "upstream.proxy":
        return f"{resolved['host']}: resolved by upstream.proxy (no address checks here)"
    if resolved["error"] is not None:
        return f"{resolved['host']}: {resolved['error']}"
    shown = [
        f"{a['address']} {'ok' if a['allowed'] else 'refused (' + str(a['reason']) + ')'}"
        for a in resolved["addresses"]
    ]
    return f"{resolved['host']}: {', '.join(shown) or 'no address'} (checks: {', '.join(resolved['checks'])})"


def _limit_text(limit: Report | None) -> str:
    if limit is None:
        return "not reached"
    if limit["max_requests"] is None:
        return f"{limit['verdict']}: {limit['note']}"
    key = f"{limit['key_kind']} {limit['key_id']}" if limit["key_id"] else "no key"
    spec = f"{limit['max_requests']} per {limit['window_s']} s in {limit['storage']}"
    used = f"{limit['count']} of {spec}" if limit["count"] is not None else f"limit {spec}"
    return f"{limit['verdict']}, {key}: {used} ({limit['note']})"


def _rewrite_text(rewrite: Report | None) -> list[str]:
    if rewrite is None:
        return ["rewrite:    - (not forwarded, or a tunnel: nothing of it is seen)"]
    if not rewrite["enabled"]:
        return [f"rewrite:    none: {rewrite['note']}"]
    if rewrite["body"]:
        body = f"body rewritten when JSON, text, JavaScript or SSE ({rewrite['body_path']} is on body_paths)"
    else:
        body = "body passes byte for byte (not on rewrite.body_paths)"
    rules = [f"              {rule['from']} -> {rule['to']}" for rule in rewrite["rules"]]
    headers = ", ".join(rewrite["headers"])
    return [
        f"rewrite:    {body}",
        f"            URL headers ({headers})" + (" with these rules:" if rules else ": no rule applies"),
        *rules,
    ]
