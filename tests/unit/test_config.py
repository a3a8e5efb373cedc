from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from gateway.config.load import ConfigError, config_path, format_key, load_config
from gateway.config.messages import _model_in
from gateway.config.model import GatewayConfig
from gateway.config.overrides import flag
from gateway.config.redact import redacted

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
    """Out of the box: Braintrust's hosted planes, the data plane advertised and shaped, not refused."""
    config = load_config(None, {}).config
    assert config.allowlist == ("www.braintrust.dev", "braintrust.dev", "api.braintrust.dev")
    assert [(r.name, r.prefix, r.upstream, r.advertise) for r in config.routes] == [
        ("app", "/", "https://www.braintrust.dev", False),
        ("data", "/data-plane", "https://api.braintrust.dev", True),
    ]
    data = config.route("data")
    assert data is not None and data.rate_limit is not None and data.rate_limit.on_limit == "delay"
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


# --- YAML as people write it ----------------------------------------------------------------------

ROUTE = "routes:\n  - {name: app, prefix: /, upstream: https://www.braintrust.dev, rate_limit: %s}\n"


@pytest.mark.parametrize("word", ["off", "false", "'off'"])
def test_a_route_limit_is_turned_off_by_off_or_false(tmp_path: Path, word: str) -> None:
    route = loads(tmp_path, ROUTE % word).routes[0]
    assert route.rate_limit is not None and route.rate_limit.max_requests == 0


@pytest.mark.parametrize("word", ["no", "true", "on", "5"])
def test_other_words_for_a_route_limit_are_refused(tmp_path: Path, word: str) -> None:
    assert problems(tmp_path, ROUTE % word) == [
        "F:2: routes[0].rate_limit: must be off or a mapping such as {max_requests: 100, window_minutes: 1}"
    ]


def test_the_global_limit_can_be_off_too(tmp_path: Path) -> None:
    assert loads(tmp_path, "rate_limit: off\n").rate_limit.max_requests == 0


def test_yaml_1_1_words_stay_words(tmp_path: Path) -> None:
    """Only true/false are booleans: `off`, `no`, `on`, `yes` reach the config as the user wrote them."""
    config = loads(tmp_path, "forward_proxy: {enabled: off}\nrewrite: {enabled: yes}\n")
    assert config.forward_proxy.enabled is False and config.rewrite.enabled is True  # then read as bools
    assert problems(tmp_path, "logging: {level: on}\n") == [
        "F:1: logging.level: must be 'debug', 'info', 'warning' or 'error'"
    ]


def test_repeated_keys_name_the_key_and_both_lines(tmp_path: Path) -> None:
    text = (
        "rate_limit:\n  max_requests: 5\n"
        "routes:\n  - name: app\n    prefix: /\n    upstream: https://www.braintrust.dev\n    prefix: /x\n"
        "rate_limit: off\n"
    )
    assert problems(tmp_path, text) == [
        "F:7: routes[0].prefix: key appears twice, at lines 5 and 7",
        "F:8: rate_limit: key appears twice, at lines 1 and 8",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "rate_limit: {max_request: 5}\n",
            ["F:1: rate_limit.max_request: unknown key; did you mean 'max_requests'?"],
        ),
        (
            "routes:\n  - {name: app, prefix: /, upstrem: https://www.braintrust.dev}\n",
            [
                "F:2: routes[0].upstream: required key is missing",
                "F:2: routes[0].upstrem: unknown key; did you mean 'upstream'?",
            ],
        ),
        ("listen: {zzz: 1}\n", ["F:1: listen.zzz: unknown key; valid keys here: host, port, tls"]),
        (
            "rewrite: {rules: [{form: 'https://a.example', to: 'https://b.example'}]}\n",
            [
                "F:1: rewrite.rules[0].from: required key is missing",
                "F:1: rewrite.rules[0].form: unknown key; did you mean 'from'?",  # the alias people write
            ],
        ),
    ],
)
def test_unknown_keys_suggest_the_closest_valid_one(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert problems(tmp_path, text) == expected


JARGON = (
    "Input should",
    "instance of",
    "valid tuple",
    "dictionary",
    "literal",
    "union",
    "Value error",
    "model",
)
BAD_VALUES: list[Any] = [[[1]], {"zz": 1}, -5, "not a valid value"]


def _leaf_keys(model: type[BaseModel], prefix: tuple[str | int, ...]) -> list[tuple[str | int, ...]]:
    keys: list[tuple[str | int, ...]] = []
    for name, info in model.model_fields.items():
        key = (*prefix, info.alias or name)
        nested = _model_in(info.annotation)
        if nested is not None:
            keys.append(key)  # the section itself, given a wrong type
            keys += _leaf_keys(nested, (*key, 0) if key == ("routes",) or key[-1] == "rules" else key)
        else:
            keys.append(key)
    return keys


def _with(key: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """A config whose only fault is `value` at `key` (a list index means: in the first item)."""
    data: dict[str, Any] = {}
    node: Any = data
    for part, following in itertools.pairwise(key):
        if isinstance(following, int):
            base = (
                {"name": "app", "prefix": "/", "upstream": "https://www.braintrust.dev"}
                if part == "routes"
                else {"from": "https://a.example", "to": "https://b.example"}
            )
            node[part] = [base]
            node = base
        elif not isinstance(part, int):
            node = node.setdefault(part, {})
    node[key[-1]] = value
    return data


@pytest.mark.parametrize("key", _leaf_keys(GatewayConfig, ()), ids=format_key)
def test_no_problem_is_worded_in_library_jargon(tmp_path: Path, key: tuple[str | int, ...]) -> None:
    """Every key, given every kind of wrong value: each problem line is in config words."""
    for value in BAD_VALUES:
        path = tmp_path / "g.yaml"
        path.write_text(yaml.safe_dump(_with(key, value)))
        try:
            load_config(path, {})
        except ConfigError as exc:
            for line in exc.problems:
                assert re.fullmatch(rf"{re.escape(str(path))}:\d+: [\w.\[\]-]+: \S.*", line), line
                assert not [word for word in JARGON if word.lower() in line.lower()], line


def test_the_shipped_data_route_accepts_off_as_written_in_its_comment(tmp_path: Path) -> None:
    """The file says `off` disables the data route's limit: written that way, it must just work."""
    text = SHIPPED.read_text().replace("rate_limit: {on_limit: delay}", "rate_limit: off")
    data = loads(tmp_path, text).route("data")
    assert data is not None and data.advertise
    assert data.rate_limit is not None and data.rate_limit.max_requests == 0


def test_disable_sysadmin_telemetry_adds_brainstore_to_deny_paths(tmp_path: Path) -> None:
    assert load_config(None, {"DISABLE_SYSADMIN_TELEMETRY": "true"}).config.deny_paths == ("/brainstore/**",)
    assert load_config(None, {"DISABLE_SYSADMIN_TELEMETRY": "false"}).config.deny_paths == ()
    path = tmp_path / "g.yaml"
    path.write_text("deny_paths: ['/v1/secret/**']\n")
    loaded = load_config(path, {"DISABLE_SYSADMIN_TELEMETRY": "TRUE"}).config
    assert loaded.deny_paths == ("/v1/secret/**", "/brainstore/**")


def test_deny_path_patterns_are_checked_at_load(tmp_path: Path) -> None:
    assert problems(tmp_path, "deny_paths: [brainstore]\n") == [
        "F:1: deny_paths[0]: 'brainstore' must start with '/'"
    ]
    text = "routes:\n  - {name: app, prefix: /, upstream: https://www.braintrust.dev, deny_paths: ['/a**']}\n"
    assert problems(tmp_path, text) == [
        "F:2: routes[0].deny_paths[0]: '/a**': '**' must be a whole segment, as in /brainstore/**"
    ]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            "redis:/h",
            "must start with one of memory://, redis://, rediss://, redis+sentinel://, redis+cluster://",
        ),
        ("memory://x", "memory:// takes nothing after it"),
        (
            "redis://a:1,b:2",
            "redis:// takes one host (several are for redis+sentinel:// or redis+cluster://)",
        ),
        ("redis://h/x", "the database after the host must be a number, got 'x'"),
        ("redis://h:99999", "bad port in 'h:99999': a number from 1 to 65535"),
        (
            "redis://h?ssl_cert_reqs=none",
            "takes no query string: set rate_limit.storage_ca_bundle for TLS, "
            "and the password through rate_limit.storage_password_file or env "
            "BT_GATEWAY_RATE_LIMIT_STORAGE_PASSWORD",
        ),
        (
            "redis+sentinel://s:26379",
            "needs the master's name after the sentinels: redis+sentinel://host:26379/mymaster",
        ),
        ("redis+cluster://a:1,b:2/0", "redis+cluster:// takes no path: a cluster has database 0 only"),
        ("redis+cluster://a:1,,b:2", "bad host '': host[:port], several separated by commas"),
    ],
)
def test_storage_uris_are_checked_at_load(tmp_path: Path, uri: str, expected: str) -> None:
    assert problems(tmp_path, f"rate_limit:\n  storage: '{uri}'\n") == [
        f"F:2: rate_limit.storage: {expected}"
    ]


def test_the_storage_password_comes_from_a_file_or_the_environment_and_is_never_printed(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "password"
    secret.write_text("p@ss word\n")
    text = f"rate_limit:\n  storage: redis+cluster://a,b:7000\n  storage_password_file: {secret}\n"
    from_file = loads(tmp_path, text)
    assert from_file.rate_limit.storage_password == "p@ss word"
    env = {"BT_GATEWAY_RATE_LIMIT_STORAGE_PASSWORD": "p@ss word"}
    from_env = load_config(None, {**env, "BT_GATEWAY_RATE_LIMIT_STORAGE": "redis://u@h/1"}).config
    assert from_env.rate_limit.storage_password == "p@ss word"
    for config in (from_file, from_env):
        assert "p@ss" not in str(redacted(config))
    assert redacted(from_file)["rate_limit"]["storage"] == "redis+cluster://a:6379,b:7000"
    assert redacted(from_env)["rate_limit"]["storage_password"] == "***"
    in_uri = loads(tmp_path, "rate_limit: {storage: 'redis+sentinel://u:p%40ss@s1,s2/m'}")
    assert redacted(in_uri)["rate_limit"]["storage"] == "redis+sentinel://u:***@s1:26379,s2:26379/m"


def test_one_storage_password_and_tls_settings_only_for_tls(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("x")
    both = f"rate_limit:\n  storage: redis://h\n  storage_password: a\n  storage_password_file: {secret}\n"
    assert problems(tmp_path, both) == [
        "F:4: rate_limit.storage_password_file: set rate_limit.storage_password or "
        "rate_limit.storage_password_file, not both"
    ]
    twice = "rate_limit:\n  storage: 'redis://:in-uri@h'\n  storage_password: a\n"
    assert problems(tmp_path, twice) == [
        "F:2: rate_limit.storage: carries a password and storage_password is set: keep one (the Secret)"
    ]
    plain = f"rate_limit:\n  storage: redis://h\n  storage_ca_bundle: {secret}\n"
    assert problems(tmp_path, plain) == [
        "F:3: rate_limit.storage_ca_bundle: only applies to a rediss:// storage"
    ]
    missing = "rate_limit:\n  storage: rediss://h\n  storage_ca_bundle: /nonexistent.pem\n"
    assert problems(tmp_path, missing) == [
        "F:3: rate_limit.storage_ca_bundle: no such file: /nonexistent.pem"
    ]
