"""Path deny-lists: glob patterns matched on a normalized path, so no spelling of a path slips past them.

Pattern grammar (one string each, compiled at load):
    pattern = 1*( "/" segment )       ; starts with "/"
    segment = "**"                    ; any number of whole segments, none included
            | *( char | "*" | "?" )   ; "*" any run within one segment, "?" one character
`/brainstore/**` matches `/brainstore`, `/brainstore/` and everything below it.

Normalization, before matching: percent-decode once (`%2F` is a `/`, `%62` a `b`), treat `\\` as `/`,
collapse runs of `/`, resolve `.` and `..` segments. A path whose `..` climbs above the root is malformed.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from gateway.errors import Code, GatewayError, Reason

BAD_PATH = GatewayError(
    Code.BAD_PATH, "the request path climbs above the root", reason=Reason.MALFORMED_TARGET
)


def normalize_path(raw_path: str) -> str | None:
    """The path as a server that decodes and resolves it would see it; None when it escapes the root.

    Most paths are normal already (nothing to decode, no empty, `.` or `..` segment): returned as they are.
    """
    if (
        raw_path.startswith("/")
        and not raw_path.endswith("/")
        and "%" not in raw_path
        and "\\" not in raw_path
        and "//" not in raw_path
        and "/." not in raw_path
    ):
        return raw_path
    return resolve_path(raw_path)


def resolve_path(raw_path: str) -> str | None:
    """`normalize_path` the long way: decode, split, resolve every segment."""
    decoded = unquote(raw_path, errors="surrogateescape").replace("\\", "/")
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if not segments:
                return None
            segments.pop()
        else:
            segments.append(segment)
    return "/" + "/".join(segments)


def _segment(text: str) -> str:
    return "".join("[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch) for ch in text)


def compile_glob(pattern: str) -> str:
    """The regular expression (unanchored text) for one pattern; raise ValueError saying what is wrong."""
    if not pattern.startswith("/"):
        raise ValueError(f"{pattern!r} must start with '/'")
    parts = []
    for segment in pattern.split("/")[1:]:
        if segment == "**":
            parts.append("(?:/[^/]*)*")
        elif "**" in segment:
            raise ValueError(f"{pattern!r}: '**' must be a whole segment, as in /brainstore/**")
        else:
            parts.append("/" + _segment(segment))
    return "".join(parts) or "/"


class PathGlobs:
    """A list of patterns compiled into one expression, matched on normalized paths."""

    __slots__ = ("_regex", "patterns")

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns
        alternatives = "|".join(f"(?:{compile_glob(p)})" for p in patterns)
        self._regex = re.compile(f"^(?:{alternatives})$") if patterns else None

    def __bool__(self) -> bool:
        return self._regex is not None

    def matches(self, path: str) -> bool:
        """Whether an already normalized path matches one of the patterns."""
        return self._regex is not None and self._regex.match(path) is not None


class PathDenyList(PathGlobs):
    """Refuses paths matching any of its patterns."""

    __slots__ = ()

    def judge(self, path: str | None) -> GatewayError | None:
        """None when the path may pass; `path_denied`, or `bad_path` for a path above the root. `path` is
        normalized already (`normalize_path`; None: it climbs above the root)."""
        if self._regex is None:
            return None
        if path is None:
            return BAD_PATH
        if self._regex.match(path):
            return GatewayError(
                Code.PATH_DENIED,
                f"the path {path[:200]!r} is not allowed through the gateway",
                reason=Reason.PATH_DENIED,
            )
        return None
