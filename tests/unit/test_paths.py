"""Path normalization and deny globs, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.policy.paths import PathDenyList, normalize_path, resolve_path


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("/a/b", "/a/b"),
        ("//a///b/", "/a/b"),
        ("/a/./b/../c", "/a/c"),
        ("/%61/%2Fb", "/a/b"),
        ("/a%2F..%2Fb", "/b"),
        ("/a\\b", "/a/b"),
        ("/", "/"),
        ("", "/"),
        ("/a/..", "/"),
        ("/..", None),
        ("/a/../..", None),
        ("/%2E%2E/x", None),
    ],
)
def test_normalize_path(raw: str, normal: str | None) -> None:
    assert normalize_path(raw) == normal


@given(st.text(alphabet="/.%2fF\\ab", max_size=24))
def test_the_shortcut_for_normal_paths_agrees_with_resolving(raw: str) -> None:
    assert normalize_path(raw) == resolve_path(raw)


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        (
            "/brainstore/**",
            ["/brainstore", "/brainstore/", "/brainstore/a/b/c"],
            ["/brainstorex", "/x/brainstore"],
        ),
        ("/v1/*/delete", ["/v1/abc/delete"], ["/v1/a/b/delete", "/v1/delete", "/v1/abc/delete/x"]),
        ("/v?/x", ["/v1/x", "/v2/x"], ["/v10/x", "/v/x"]),
        ("/**/admin", ["/admin", "/a/admin", "/a/b/admin"], ["/a/admins"]),
        ("/a.b", ["/a.b"], ["/axb"]),  # no regular-expression meaning leaks through
    ],
)
def test_globs(pattern: str, matches: list[str], misses: list[str]) -> None:
    deny = PathDenyList((pattern,))
    assert [p for p in matches if deny.judge(normalize_path(p)) is None] == []
    assert [p for p in misses if deny.judge(normalize_path(p)) is not None] == []


def test_an_empty_list_lets_everything_through() -> None:
    deny = PathDenyList(())
    assert not deny
    assert (
        deny.judge(normalize_path("/../../x")) is None
    )  # nothing to match: the path is the upstream's business
