"""JSON an upstream controls (audit headers, control documents), parsed so it can only fail as ValueError.

Python's parser recurses once per nesting level: a document nested a few thousand deep raises RecursionError,
which no caller expects, and one nested a few hundred deep parses but is costly to walk and write again.
Braintrust's documents nest at most 5 deep (`{"org_info": [{...}]}`, a resource list of objects); 32 leaves
room for any future shape and stays far below the interpreter's recursion limit (1000), so whatever is
accepted can be walked and dumped again safely. NaN and Infinity are not JSON (RFC 8259) and are refused too.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 32


class JsonTooDeep(ValueError):
    """The document nests deeper than MAX_DEPTH."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:32]} is out of range")
    return value


def loads(text: str | bytes) -> Any:
    """The parsed document; ValueError when it is not JSON, JsonTooDeep when it nests past MAX_DEPTH."""
    try:
        doc = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite)
    except RecursionError:
        raise JsonTooDeep(f"nested deeper than {MAX_DEPTH}") from None
    stack = [(doc, 1)]
    while stack:  # iterative: the check itself must not recurse
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth >= MAX_DEPTH:
                    raise JsonTooDeep(f"nested deeper than {MAX_DEPTH}")
                stack.append((child, depth + 1))
    return doc
