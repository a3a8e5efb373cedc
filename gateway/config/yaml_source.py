"""Reading a config file as people write it: YAML 1.2 booleans, duplicate keys refused, a line per key.

PyYAML implements YAML 1.1, where unquoted `off`, `no`, `on` and `yes` are booleans, so `rate_limit: off`
would reach the config as `false`. Here only `true` and `false` are booleans (the YAML 1.2 core schema):
`off` stays the word the user wrote. PyYAML also lets the last of two equal keys win without a word; here
each repeated key is a problem naming both lines.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.config.overrides import KeyPath

_BOOL = "tag:yaml.org,2002:bool"
_MERGE = "<<"


class Yaml12Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: `true`/`false` only."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


@dataclass
class YamlSource:
    """A file's data, the line of every key and list item, and its problems as (line, key, text)."""

    data: dict[str, Any]
    lines: dict[KeyPath, int]
    problems: list[tuple[int | None, KeyPath, str]] = field(default_factory=list)


def read_yaml(path: Path) -> YamlSource:
    """Read and parse one config file; never raises for a bad file, returns its problems instead."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return YamlSource({}, {}, [(None, (), f"cannot read the file: {reason}")])
    return parse_yaml(text)


def parse_yaml(text: str) -> YamlSource:
    loader = Yaml12Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        return YamlSource({}, {}, [(mark.line + 1 if mark else None, (), f"invalid YAML: {problem}")])
    finally:
        loader.dispose()
    if data is None:
        return YamlSource({}, {})
    if not isinstance(data, dict):
        return YamlSource({}, {}, [(1, (), "the top level must be a mapping of keys")])
    source = YamlSource(data, {})
    assert node is not None  # data came from it
    _walk(node, (), source)
    return source


def _walk(node: yaml.Node, key: KeyPath, source: YamlSource) -> None:
    """Record the line of every key and list item; report every key a mapping repeats."""
    if isinstance(node, yaml.MappingNode):
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.value == _MERGE:
                continue
            line = key_node.start_mark.line + 1
            child = (*key, key_node.value)
            if key_node.value in first_line:
                text = f"key appears twice, at lines {first_line[key_node.value]} and {line}"
                source.problems.append((line, child, text))
                continue
            first_line[key_node.value] = line
            source.lines[child] = line
            _walk(value_node, child, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            child = (*key, index)
            source.lines[child] = item.start_mark.line + 1
            _walk(item, child, source)
