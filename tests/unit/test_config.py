from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.load import ConfigError, config_path, format_key, load_config
from gateway.config.model import GatewayConfig
from gateway.config.overrides import flag

SHIPPED = Path(__file__).resolve().parents[2] / "config" / "gateway.yaml"


def problems(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    """The problem lines for a config file, with its path shortened to `F` for readable expectations."""
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, env or {})
    return [line.replace(str(path), "F") for line in info.value.problems]


def loads(tmp_path: Path, text: str) -> GatewayConfig:
    path = tmp_path / "g.yaml"
    path.write_text(text)
    return load_config(path, {}).config


def test_shipped_config_equals_builtin_defaults() -> None:
    assert load_config(SHIPPED, {}).config == GatewayConfig()


def test_builtin_defaults_match_the_contract() -> None:
    config = load_config(None, {}).config
    assert config.allowlist == ("www.braintrust.dev", "braintrust.dev")
    assert [(r.name, r.prefix, r.upstream) for r in config.routes] == [
        ("app", "/", "https://www.braintrust.dev")
    ]
    assert config.upstream.read_timeout_s == 300
    assert config.shutdown_timeout_s == 15


def test_every_problem_is_reported_with_its_line(tmp_path: Path) -> None:
    text = "listen:\n  port: 99999\n  hots: x\nlogging: {format: xml}\n"
    assert problems(tmp_path, text) == [
        "F:2: listen.port: must be less than or equal to 65535",
        "F:3: listen.hots: unknown key; did you mean 'host'?",
        "F:4: logging.format: must be 'json' or 'console'",
    ]


def test_bad_types(tmp_path: Path) -> None:
    assert problems(tmp_path, "allowlist: braintrust.dev\n") == ["F:1: allowlist: must be a list"]
    assert problems(tmp_path, "upstream: {read_timeout_s: -1}\n") == [
        "F:1: upstream.read_timeout_s: must be greater than 0"
    ]
    assert problems(tmp_path, "listen: 8080\n") == ["F:1: listen: must be a mapping of keys"]


def test_route_errors(tmp_path: Path) -> None:
    text = "routes:\n  - {name: app, prefix: x, upstream: 'https://www.braintrust.dev?a=1'}\n"
    assert problems(tmp_path, text) == [
        "F:2: routes[0].prefix: must start with '/' and hold only a path, e.g. /data-plane",
        "F:2: routes[0].upstream: must not carry a query or fragment: 'https://www.braintrust.dev?a=1'",
    ]
    dup = (
        "routes:\n  - {name: app, prefix: /, upstream: https://www.braintrust.dev}\n"
        "  - {name: app, prefix: /x, upstream: https://www.braintrust.dev}\n"
    )
    assert problems(tmp_path, dup) == ["F:3: routes[1].name: duplicate route name 'app'"]


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    assert problems(tmp_path, "- a\n") == ["F:1: config: the top level must be a mapping of keys"]


def test_env_overrides_yaml_and_flags_override_env(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(
        "listen: {port: 1000}\nallowlist: [www.braintrust.dev, braintrust.dev, api.braintrust.dev]\n"
    )
    env = {
        "BT_GATEWAY_LISTEN_PORT": "2000",
        "BRAINTRUST_APP_URL": "https://api.braintrust.dev",
        "BRAINTRUST_APP_PUBLIC_URL": "https://braintrust.dev/",
    }
    config = load_config(path, env, (flag("--listen-port", 3000, "listen", "port"),)).config
    assert config.listen.port == 3000
    assert config.routes[0].upstream == "https://api.braintrust.dev"
    assert config.public_url == "https://braintrust.dev"
    assert load_config(path, env).config.listen.port == 2000


def test_env_allowlist_is_comma_separated() -> None:
    config = load_config(
        None, {"BT_GATEWAY_ALLOWLIST": "www.braintrust.dev, braintrust.dev ,*.braintrust.dev"}
    ).config
    assert config.allowlist == ("www.braintrust.dev", "braintrust.dev", "*.braintrust.dev")


def test_app_url_without_app_route_is_an_error(tmp_path: Path) -> None:
    text = "routes:\n  - {name: data, prefix: /, upstream: https://www.braintrust.dev}\n"
    assert problems(tmp_path, text, {"BRAINTRUST_APP_URL": "https://braintrust.dev"}) == [
        "env BRAINTRUST_APP_URL: routes.app.upstream: no route named 'app' to apply it to"
    ]


def test_config_path_precedence(tmp_path: Path) -> None:
    assert config_path("a.yaml", {"BT_GATEWAY_CONFIG": "b.yaml"}) == Path("a.yaml")
    assert config_path(None, {"BT_GATEWAY_CONFIG": "b.yaml"}) == Path("b.yaml")


def test_format_key() -> None:
    assert format_key(("routes", 1, "upstream")) == "routes[1].upstream"
    assert format_key(()) == "config"


def test_config_is_immutable() -> None:
    config = GatewayConfig()
    with pytest.raises(ValueError, match="frozen"):
        config.listen.port = 1  # type: ignore[misc]
