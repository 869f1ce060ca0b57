"""The commands a user types: herd, herd-node, herd serve, herd status, herd demo."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from herd import cli
from herd.config import OPTIONS
from herd.demo import DEMO_FLEET, run_demo
from herd.sim import SimConfig, SimModel, run_sim
from herd.status import render_status
from tests.conftest import running_fleet, two_node_specs

# Polling interval for waiting on another *process* (nothing to wait on but its HTTP answer).
POLL_SECONDS = 0.05


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    env["FLEET_DATA_DIR"] = str(tmp_path)
    env["FLEET_MDNS"] = "false"  # tests send nothing beyond loopback
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_status(url: str, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False) as client:
        while True:
            try:
                status: dict[str, Any] = (await client.get(url + "/fleet/status")).json()
                if ready(status):
                    return status
            except httpx.TransportError:
                pass
            await trio.sleep(POLL_SECONDS)


def test_help_lists_every_option(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "herd", "--help"],
        capture_output=True,
        text=True,
        env=clean_env(tmp_path),
        check=True,
    )
    for option in OPTIONS:
        assert option.flag in result.stdout
        assert option.env in result.stdout
    assert "herd demo" in result.stdout


def test_node_with_a_bad_router_url_says_what_is_wrong(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from herd.cli import node_main; sys.exit(node_main())",
            "--router-url",
            "ftp://nowhere",
        ],
        capture_output=True,
        text=True,
        env=clean_env(tmp_path),
        check=False,
    )
    assert result.returncode == 2
    assert "router URL must start with http://" in result.stderr


def test_bad_option_value_is_a_clear_error(tmp_path: Path) -> None:
    env = clean_env(tmp_path) | {"FLEET_MAX_RETRIES": "many"}
    result = subprocess.run(
        [sys.executable, "-m", "herd"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 2
    assert "FLEET_MAX_RETRIES='many'" in result.stderr


async def test_router_with_local_node_serves_and_status_prints(tmp_path: Path) -> None:
    """The README's main command, against a simulated Ollama standing in for the local one."""
    spec = SimConfig(name="local", models=(SimModel("llama3.2:3b"),), loaded=("llama3.2:3b",))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with run_sim(spec) as sim:
        env = clean_env(tmp_path) | {"FLEET_NODE_OLLAMA_HOST": sim.url, "FLEET_NODE_ID": "box"}
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "herd",
                "serve",
                "--role",
                "router",
                "--local-node",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "WARNING",
            ],
            env=env,
        )
        try:
            with trio.fail_after(30):
                status = await wait_for_status(url, lambda s: s["fleet"]["nodes_online"] == 1)
            assert status["nodes"][0]["node_id"] == "box"
            async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
                reply = await client.post(
                    "/api/generate",
                    json={"model": "llama3.2:3b", "prompt": "zebra-secret-prompt", "stream": False},
                )
            assert reply.status_code == 200 and reply.headers["x-herd-node"] == "box"
            printed = await trio.run_process(
                [sys.executable, "-m", "herd", "status", "--url", url], capture_stdout=True, env=env
            )
            text = printed.stdout.decode()
            assert "1/1 nodes online" in text
            assert "box" in text and "hot   llama3.2:3b" in text
        finally:
            process.send_signal(signal.SIGINT)
            with trio.fail_after(15):
                code = await process.wait()
    assert code == 0
    # The router's JSON-lines log: one object a line, no prompt text in it.
    lines = (tmp_path / "logs" / "herd.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert any("box joined" in r["message"] for r in records)
    assert not any("zebra-secret-prompt" in line for line in lines)
    # The in-process node logs to the node's own file, as a herd-node process would.
    assert not any(r["logger"] == "herd.node" for r in records)
    node_lines = (tmp_path / "logs" / "herd-node.jsonl").read_text().splitlines()
    node_records = [json.loads(line) for line in node_lines]
    assert node_records and all(r["logger"] == "herd.node" for r in node_records)


def test_status_when_router_is_down(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "herd", "status", "--url", f"http://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        env=clean_env(tmp_path),
        check=False,
    )
    assert result.returncode == 1
    assert "Is the router running?" in result.stderr


def test_status_rendering_with_no_nodes() -> None:
    text = render_status(
        {"fleet": {"nodes_total": 0, "nodes_online": 0}, "nodes": [], "queues": {}}
    )
    assert "herd-node --router-url" in text


async def test_demo_runs_a_simulated_fleet_with_traffic(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(run_demo, "127.0.0.1", 0, True)
        status = await wait_for_status(
            url, lambda s: sum(q["done"] for q in s["queues"].values()) >= 5
        )
        assert status["fleet"]["nodes_online"] == len(DEMO_FLEET)
        assert {n["node_id"] for n in status["nodes"]} == {s.name for s in DEMO_FLEET}
        kinds = {q["kind"] for q in status["queues"].values()}
        assert "text" in kinds
        nursery.cancel_scope.cancel()


async def test_node_drains_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    from herd.config import RouterConfig
    from herd.router.service import Router

    spec = SimConfig(name="n", models=(SimModel("llama3.2:3b"),))
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path))
    async with Router(config) as router, run_sim(spec) as sim:
        env = clean_env(tmp_path) | {"FLEET_NODE_OLLAMA_HOST": sim.url}
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-c",
                "import sys; from herd.cli import node_main; sys.exit(node_main())",
                "--router-url",
                router.url,
                "--node-id",
                "leaver",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--log-level",
                "WARNING",
            ],
            env=env,
        )
        with trio.fail_after(30):
            await router.wait_nodes(1)
            process.send_signal(signal.SIGTERM)
            saw_draining = False
            while router.fleet.nodes[0].status.value != "offline":
                saw_draining = saw_draining or router.fleet.nodes[0].report.draining
                await router.state.wait_fleet_changed()
            assert saw_draining
            assert await process.wait() == 0


def test_serve_raises_the_open_file_limit() -> None:
    """1,000 streams hold 2,000 sockets; macOS starts processes with a soft limit of 256."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        now = cli.raise_open_file_limit(4096)
        assert now == min(4096, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_status_with_an_api_key(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, two_node_specs(), api_keys=("sesame",)) as fleet:
        status = [sys.executable, "-m", "herd", "status", "--url", fleet.url]
        env = clean_env(tmp_path)

        async def run(args: list[str], extra: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
            return await trio.run_process(
                args, env=env | extra, capture_stdout=True, capture_stderr=True, check=False
            )

        refused = await run(status, {})
        assert refused.returncode == 1
        assert b"requires an API key" in refused.stderr
        flag = await run([*status, "--api-key", "sesame"], {})
        assert flag.returncode == 0 and b"2/2 nodes online" in flag.stdout
        from_env = await run(status, {"FLEET_API_KEYS": "sesame,other"})
        assert from_env.returncode == 0 and b"2/2 nodes online" in from_env.stdout
