"""Option precedence: flag > environment > <data-dir>/env > default."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from herd.cli import flags_of, node_config, router_config, serve_parser
from herd.config import (
    DEFAULT_NODE_PORT,
    DEFAULT_PORT,
    OPTIONS,
    OPTIONS_BY_NAME,
    ConfigError,
    NodeConfig,
    RouterConfig,
    parse_ollama_host,
    read_env_file,
    redacted,
    resolve,
)
from herd.state.registry import NodeRegistry


def parse(argv: list[str]) -> dict[str, object]:
    return flags_of(serve_parser("herd", None).parse_args(argv))


def test_env_is_not_masked_by_a_flag_default(tmp_path: Path) -> None:
    env = {"FLEET_PORT": "12345", "FLEET_MAX_RETRIES": "5", "FLEET_DATA_DIR": str(tmp_path)}
    config = router_config(parse([]), env)
    assert config.port == 12345
    assert config.max_retries == 5


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    (tmp_path / "env").write_text(
        "# comment\nFLEET_QUEUE_TIMEOUT=7\nexport FLEET_MAX_RETRIES='4'\nFLEET_PORT=1111\n"
    )
    env = {"FLEET_DATA_DIR": str(tmp_path), "FLEET_PORT": "2222"}
    config = router_config(parse(["--port", "3333"]), env)
    assert config.port == 3333  # flag
    config = router_config(parse([]), env)
    assert config.port == 2222  # environment
    assert config.max_retries == 4  # env file
    assert config.queue_timeout == 7.0  # env file
    assert config.heartbeat_timeout == 15.0  # default


def test_data_dir_flag_chooses_the_env_file(tmp_path: Path) -> None:
    (tmp_path / "env").write_text("FLEET_HEARTBEAT_INTERVAL=2.5\n")
    config = router_config(parse(["--data-dir", str(tmp_path)]), {})
    assert config.heartbeat_interval == 2.5


def test_api_keys_from_flags_and_env() -> None:
    assert router_config(parse(["--api-key", "a", "--api-key", "b"]), {}).api_keys == ("a", "b")
    assert router_config(parse([]), {"FLEET_API_KEYS": "x, y,,"}).api_keys == ("x", "y")


def test_node_options(tmp_path: Path) -> None:
    env = {
        "FLEET_DATA_DIR": str(tmp_path),
        "FLEET_NODE_ROUTER_URL": "http://10.0.0.5:11435",
        "FLEET_NODE_OLLAMA_HOST": "http://127.0.0.1:9999",
        "FLEET_NODE_ENABLE_CAPACITY_LEARNING": "true",
    }
    config = node_config(parse(["--node-id", "studio"]), env)
    assert config.router_url == "http://10.0.0.5:11435"
    assert config.ollama_url == "http://127.0.0.1:9999"
    assert config.node_id == "studio"
    assert config.learn_capacity is True
    assert config.port == 11436


def test_model_slots_name_models_as_ollama_resolves_them(tmp_path: Path) -> None:
    env = {"FLEET_DATA_DIR": str(tmp_path)}
    config = node_config(parse(["--model-slots", "slow=1, nomic-embed-text:v1.5=2"]), env)
    assert config.model_slots == {"slow:latest": 1, "nomic-embed-text:v1.5": 2}
    with pytest.raises(ConfigError) as info:
        node_config(parse(["--model-slots", "slow=many"]), env)
    assert str(info.value) == "--model-slots: slots must be a whole number, got 'many' for slow"


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="FLEET_MAX_RETRIES='lots'"):
        resolve("router", {}, {"FLEET_MAX_RETRIES": "lots", "FLEET_DATA_DIR": str(tmp_path)})


def test_secrets_are_never_shown(tmp_path: Path) -> None:
    values = resolve("router", {}, {"FLEET_AUTH_TOKEN": "hunter2", "FLEET_DATA_DIR": str(tmp_path)})
    assert redacted(values)["auth_token"] == "set"
    with pytest.raises(ConfigError) as info:
        resolve("router", {}, {"FLEET_PORT": "hunter2", "FLEET_DATA_DIR": str(tmp_path)})
    assert "hunter2" in str(info.value)  # not a secret option: the value helps


def test_every_option_is_in_help_and_docs() -> None:
    help_text = serve_parser("herd", None).format_help()
    docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    for option in OPTIONS:
        assert option.flag in help_text
        assert option.env in docs, option.env
        assert option.flag in docs, option.flag


def test_env_file_parsing(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text('A=1\n\n# x\nB="two words"\nnot a line\n')
    assert read_env_file(path) == {"A": "1", "B": "two words"}
    assert read_env_file(tmp_path / "missing") == {}


def test_docs_name_no_option_that_does_not_exist() -> None:
    import re

    docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `(--[a-z-]+)`", docs, flags=re.MULTILINE))
    assert documented == {o.flag for o in OPTIONS}


def test_docs_have_each_option_once() -> None:
    docs = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    rows = re.findall(r"^\| `(--[a-z-]+)`", docs, flags=re.MULTILINE)
    assert sorted(rows) == sorted(o.flag for o in OPTIONS)  # no option twice
    # The commands' own flags have sections of their own, outside the table.
    assert "## `--local-node`" in docs and "## `herd demo`" in docs
    for flag in ("--traffic", "--mdns", "--quiet"):
        assert f"`{flag}`" in docs.split("## `herd demo`")[1]


@pytest.mark.parametrize(
    ("value", "url"),
    [
        ("studio", "http://studio:11434"),
        ("studio:8080", "http://studio:8080"),
        (":9999", "http://127.0.0.1:9999"),
        ("", "http://127.0.0.1:11434"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("0.0.0.0:11500", "http://127.0.0.1:11500"),
        ("127.0.0.1:11434", "http://127.0.0.1:11434"),
        ("http://10.0.0.7:11434", "http://10.0.0.7:11434"),
        ("http://10.0.0.7:11434/", "http://10.0.0.7:11434"),
        ("HTTPS://box.example", "https://box.example:443"),
        ("http://box", "http://box:80"),  # a URL without a port: the scheme's, as Ollama says
        ("http://box:8000/v1", "http://box:8000/v1"),
        ("[::1]:11434", "http://[::1]:11434"),
        ("::1", "http://[::1]:11434"),
        ("[::]", "http://[::1]:11434"),
        ("  studio  ", "http://studio:11434"),
    ],
)
def test_ollama_host_forms(value: str, url: str) -> None:
    assert parse_ollama_host(value) == url


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("http://", "names no host"),
        ("http://:8080", "names no host"),
        ("host:port:x", "must look like HOST, HOST:PORT, :PORT or http://HOST:PORT"),
        ("studio:", "must look like"),
        ("studio:abc", "has a bad port 'abc'"),
        ("studio:70000", "has a bad port '70000'"),
        ("ftp://studio", "must use http:// or https://"),
        ("[::1", "must look like"),
        ("user@studio:1", "must look like"),
    ],
)
def test_bad_ollama_hosts_say_what_is_expected(value: str, said: str) -> None:
    with pytest.raises(ValueError, match=re.escape(said)):
        parse_ollama_host(value)


def test_ollama_host_is_read_last(tmp_path: Path) -> None:
    """--ollama-url > FLEET_NODE_OLLAMA_HOST > the env file's > Ollama's OLLAMA_HOST."""
    env = {"FLEET_DATA_DIR": str(tmp_path), "OLLAMA_HOST": "0.0.0.0:11500"}
    assert node_config(parse([]), env).ollama_url == "http://127.0.0.1:11500"
    assert node_config(parse([]), {"FLEET_DATA_DIR": str(tmp_path)}).ollama_url == (
        "http://localhost:11434"
    )
    (tmp_path / "env").write_text("FLEET_NODE_OLLAMA_HOST=filed:1\n")
    assert node_config(parse([]), env).ollama_url == "http://filed:1"
    with_var = env | {"FLEET_NODE_OLLAMA_HOST": "fleet-var:2"}
    assert node_config(parse([]), with_var).ollama_url == "http://fleet-var:2"
    assert node_config(parse(["--ollama-url", "flag:3"]), with_var).ollama_url == "http://flag:3"
    # A router alone never reads it; an empty one is as good as unset.
    assert "ollama_url" not in resolve("router", {}, env)
    empty = {"FLEET_DATA_DIR": str(tmp_path / "none"), "OLLAMA_HOST": " "}
    assert node_config(parse([]), empty).ollama_url == "http://localhost:11434"


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--heartbeat-interval", "-1"], "--heartbeat-interval must be > 0, got -1"),
        (["--heartbeat-interval", "soon"], "--heartbeat-interval must be a number > 0, got 'soon'"),
        (["--port", "70000"], "--port must be 0..65535, got 70000"),
        (["--port", "http"], "--port must be a port number 0..65535, got 'http'"),
        (["--max-retries", "-2"], "--max-retries must be >= 0, got -2"),
        (["--mdns", "maybe"], "--mdns must be true or false (or 1/0, yes/no, on/off)"),
        (["--log-level", "loud"], "--log-level must be one of DEBUG, INFO, WARNING"),
        (["--model-alias", "x"], "--model-alias: a model alias looks like"),
    ],
)
def test_bad_flags_are_named_with_their_rule(tmp_path: Path, argv: list[str], said: str) -> None:
    with pytest.raises(ConfigError) as info:
        router_config(parse(argv), {"FLEET_DATA_DIR": str(tmp_path)})
    assert str(info.value).startswith(said)


def test_flags_are_parsed_by_the_options_rules(tmp_path: Path) -> None:
    env = {"FLEET_DATA_DIR": str(tmp_path)}
    config = router_config(
        parse(["--heartbeat-interval", "2.5", "--mdns", "off", "--log-level", "debug", "--quiet"]),
        env,
    )
    assert config.heartbeat_interval == 2.5 and config.mdns is False
    assert config.log_level == "DEBUG" and config.quiet is True
    assert router_config(parse([]), env | {"FLEET_QUIET": "yes"}).quiet is True
    node = node_config(parse(["--ollama-url", "127.0.0.1:11434"]), env)
    assert node.ollama_url == "http://127.0.0.1:11434"  # no scheme: normalised, not broken


def test_options_that_contradict_each_other_are_refused() -> None:
    from herd.config import RouterConfig

    with pytest.raises(ConfigError, match=r"--heartbeat-offline \(10\) must be greater"):
        RouterConfig(heartbeat_timeout=15, heartbeat_offline=10)
    with pytest.raises(ConfigError, match=r"--heartbeat-timeout \(5\) must be greater"):
        RouterConfig(heartbeat_interval=5, heartbeat_timeout=5)


def test_config_defaults_are_written_once_in_the_options_table() -> None:
    """The config classes take their defaults from OPTIONS; the only differences are the
    embedded router's stated ones (loopback, no mDNS) and the role-dependent port."""
    embedded = {("RouterConfig", "host"), ("RouterConfig", "mdns")}
    role_ports = {("RouterConfig", "port"): DEFAULT_PORT, ("NodeConfig", "port"): DEFAULT_NODE_PORT}
    for cls in (RouterConfig, NodeConfig):
        for field in attrs.fields(cls):
            key = (cls.__name__, field.name)
            default = field.default
            if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                default = default.factory()
            if key in role_ports:
                assert default == role_ports[key]
            elif key == ("NodeConfig", "model_slots"):  # the option unset: no per-model limits
                assert OPTIONS_BY_NAME["model_slots"].default is None and default == {}
            elif key == ("NodeConfig", "more_router_urls"):  # --router-url's second and on
                assert OPTIONS_BY_NAME["router_url"].default is None and default == ()
            elif key not in embedded:
                assert default == OPTIONS_BY_NAME[field.name].default, key


def test_the_registry_ages_nodes_by_the_options_defaults() -> None:
    registry = NodeRegistry()
    for name in ("heartbeat_timeout", "heartbeat_offline", "forget_after"):
        assert getattr(registry, name) == OPTIONS_BY_NAME[name].default, name


@pytest.mark.parametrize(
    "url",
    ["valkey://10.0.0.7:6379/2", "redis://:secret@cache", "unix:///run/valkey.sock?db=1"],
)
def test_the_state_store_url(tmp_path: Path, url: str) -> None:
    values = resolve("router", {"state": url}, {"FLEET_DATA_DIR": str(tmp_path)})
    assert RouterConfig.from_options(values).state == url
    assert RouterConfig().state is None  # embedded: one router, all in memory


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("http://cache:6379", "must be valkey://"),
        ("valkey://", "names no host"),
        ("valkey://cache/zero", "has a database that is not a number"),
        ("valkey://cache:port", "has a bad port"),
    ],
)
def test_a_bad_state_store_url_is_named(tmp_path: Path, url: str, said: str) -> None:
    with pytest.raises(ConfigError, match=f"--state {said}"):
        resolve("router", {"state": url}, {"FLEET_DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="FLEET_STATE="):
        resolve("router", {}, {"FLEET_STATE": url, "FLEET_DATA_DIR": str(tmp_path)})


def test_router_url_is_repeatable(tmp_path: Path) -> None:
    env = {"FLEET_DATA_DIR": str(tmp_path)}
    flags = {"router_url": ["http://a:11435", "http://b:11435/", "http://a:11435"]}
    config = NodeConfig.from_options(resolve("node", flags, env))
    assert config.router_url == "http://a:11435"
    assert config.router_urls == ("http://a:11435", "http://b:11435")  # each once
    from_env = NodeConfig.from_options(
        resolve("node", {}, env | {"FLEET_NODE_ROUTER_URL": "http://a:1, http://b:2"})
    )
    assert from_env.router_urls == ("http://a:1", "http://b:2")
    assert NodeConfig().router_urls == ()  # none: found by mDNS
