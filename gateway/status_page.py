"""The status page itself: one HTML file shipped in the package, served with a Content-Security-Policy.

The page must work where nothing outside the admin listener is reachable, and must not become a way to run
someone else's script (it shows host names that clients chose). So it carries its one script and one style
inline, and the policy allows exactly those two by their sha256 (computed here, once, at start-up), data
fetched from its own origin, and nothing else: no other script, style, font, image, frame or form target.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from importlib import resources

RESOURCE = "status.html"


def _inline(html: str, tag: str) -> str:
    """The text of the page's one `<tag>` element, exactly as the browser hashes it."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    if html.count(opening) != 1 or html.count(closing) != 1:
        raise ValueError(f"{RESOURCE} must hold exactly one {opening} element")
    return html.partition(opening)[2].partition(closing)[0]


def source_hash(text: str) -> str:
    """A CSP hash source (`'sha256-<base64>'`) for an inline element's text."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(html: str) -> str:
    return "; ".join(
        (
            "default-src 'none'",
            f"script-src {source_hash(_inline(html, 'script'))}",
            f"style-src {source_hash(_inline(html, 'style'))}",
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


@dataclass(frozen=True, slots=True)
class StatusPage:
    """The page's bytes and the headers it is served with."""

    body: bytes
    headers: tuple[tuple[str, str], ...]

    @classmethod
    def load(cls) -> StatusPage:
        html = resources.files("gateway").joinpath(RESOURCE).read_text(encoding="utf-8")
        headers = (
            ("Content-Type", "text/html; charset=utf-8"),
            ("Content-Security-Policy", content_security_policy(html)),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
        )
        return cls(html.encode(), headers)
