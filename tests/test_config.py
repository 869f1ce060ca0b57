"""Option precedence: flag > environment > <data-dir>/env > default."""

from __future__ import annotations

from pathlib import Path

import pytest

from herd.cli import flags_of, node_config, router_config, serve_parser
from herd.config import OPTIONS, ConfigError, read_env_file, redacted, resolve


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
