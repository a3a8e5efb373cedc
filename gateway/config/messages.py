"""Validation errors in the words of the config file, not of the library that checked it.

pydantic speaks of "a valid tuple" and "an instance of Listen"; the person editing YAML wrote a list and a
mapping. Every error type a config can meet is worded here, and an unknown key gets the closest valid key.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails

from gateway.config.model import GatewayConfig
from gateway.config.overrides import KeyPath

_BY_TYPE = {
    "missing": "required key is missing",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "set_type": "must be a list",
    "dict_type": "must be a mapping of keys",
    "model_type": "must be a mapping of keys",
    "model_attributes_type": "must be a mapping of keys",
    "none_required": "must be null",
}


def plain_message(error: ErrorDetails, key: KeyPath) -> str:
    """The problem in config words: no library names, types or jargon."""
    kind = error["type"]
    if kind == "extra_forbidden":
        return _unknown_key(key)
    if kind in _BY_TYPE:
        return _BY_TYPE[kind]
    message = error["msg"].removeprefix("Value error, ")
    if message.startswith("Input should be "):
        message = "must be " + message.removeprefix("Input should be ")
    return message


def _unknown_key(key: KeyPath) -> str:
    valid = valid_keys(key[:-1])
    if not valid:
        return "unknown key"
    close = difflib.get_close_matches(str(key[-1]), valid, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean {close[0]!r}?"
    return f"unknown key; valid keys here: {', '.join(valid)}"


def valid_keys(path: KeyPath) -> list[str]:
    """The keys a mapping at `path` may hold (list indexes in `path` are skipped)."""
    model: type[BaseModel] | None = GatewayConfig
    for part in path:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = next((f for name, f in model.model_fields.items() if (f.alias or name) == part), None)
        model = _model_in(field.annotation) if field is not None else None
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config section model inside an annotation such as `tuple[Route, ...]` or `RouteLimit | None`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
