"""The commands a user types: herd, herd-node, herd serve, herd status, herd demo, herd node.

Each runs as a subprocess (``sys.executable -m herd ...``) importing this checkout's code, as a
new user would run it: start-up errors are one line and exit 2, help is per command, the lines an
operator reads at start and per request, pause and resume, OLLAMA_HOST, a closed pipe."""

from __future__ import annotations

import fcntl
import gc
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from herd import cli
from herd.config import OPTIONS
from herd.demo import DEMO_FLEET, run_demo
from herd.sim import SimConfig, SimModel, run_sim
from herd.status import render_status
from tests.conftest import in_thread, running_fleet, two_node_specs

# Polling interval for waiting on another *process* (nothing to wait on but its HTTP answer).
POLL_SECONDS = 0.05
CHECKOUT = Path(__file__).resolve().parent.parent
NODE = [sys.executable, "-c", "import sys; from herd.cli import node_main; sys.exit(node_main())"]
HERD = [sys.executable, "-m", "herd"]


def clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_") and k != "OLLAMA_HOST"}
    env["FLEET_DATA_DIR"] = str(tmp_path)
    env["FLEET_MDNS"] = "false"  # tests send nothing beyond loopback
    env["PYTHONPATH"] = str(CHECKOUT)  # this checkout's herd, whatever is installed
    return env


def run_cli(
    args: list[str], tmp_path: Path, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        env=clean_env(tmp_path) | (extra or {}),
        cwd=CHECKOUT,
        timeout=60,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """A start-up error as promised: exit 2, one line on stderr, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


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
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # one line: what, why, what to do
    assert "cannot read" in line and "ConnectError" in line
    assert "is the router running? Start it with: herd" in line


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
    from herd.http.service import Router

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


async def test_serve_tunes_the_garbage_collector_and_an_embedded_router_does_not(
    tmp_path: Path,
) -> None:
    """``herd serve`` freezes what start-up made and raises the first-generation threshold;
    a herd.Router running inside another program leaves that program's collector alone."""
    before = gc.get_threshold()
    async with running_fleet(tmp_path, two_node_specs()) as fleet:
        assert fleet.url and gc.get_threshold() == before
    frozen = gc.get_freeze_count()
    try:
        cli.tune_garbage_collector()
        assert gc.get_threshold() == (cli.GC_THRESHOLD, *before[1:])
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_status_with_an_api_key(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, two_node_specs(), api_keys=("sesame",)) as fleet:
        status = [sys.executable, "-m", "herd", "status", "--url", fleet.url]
        env = clean_env(tmp_path)

        async def run(args: list[str], extra: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
            return await trio.run_process(
                args, env=env | extra, capture_stdout=True, capture_stderr=True, check=False
            )

        refused = await run(status, {})
        assert refused.returncode == 2
        assert b"requires an API key" in refused.stderr
        flag = await run([*status, "--api-key", "sesame"], {})
        assert flag.returncode == 0 and b"2/2 nodes online" in flag.stdout
        from_env = await run(status, {"FLEET_API_KEYS": "sesame,other"})
        assert from_env.returncode == 0 and b"2/2 nodes online" in from_env.stdout


# ---------------------------------------------------------------------------------------------
# Start-up errors: one line, exit 2
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [HERD, NODE], ids=["herd", "herd-node"])
def test_a_port_in_use_is_one_line_saying_what_to_do(tmp_path: Path, command: list[str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        extra = ["--router-url", "http://127.0.0.1:9"] if command is NODE else []
        result = run_cli([*command, "--host", "127.0.0.1", "--port", str(port), *extra], tmp_path)
    line = one_line_error(result)
    assert f"cannot listen on 127.0.0.1:{port}: the address is already in use" in line
    assert "--port N (or FLEET_PORT=N)" in line and "stop the other process" in line


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (["--heartbeat-interval", "-1"], {}, "herd: --heartbeat-interval must be > 0, got -1"),
        (["--port", "70000"], {}, "herd: --port must be 0..65535, got 70000"),
        (
            [],
            {"FLEET_MAX_RETRIES": "lots"},
            "herd: FLEET_MAX_RETRIES='lots' (from environment) is invalid: "
            "must be a whole number >= 0",
        ),
        (["--log-level", "loud"], {}, "herd: --log-level must be one of DEBUG, INFO"),
        (["--model-alias", "nonsense"], {}, "herd: --model-alias: a model alias looks like"),
    ],
)
def test_bad_values_are_said_in_flag_terms(
    tmp_path: Path, args: list[str], env: dict[str, str], said: str
) -> None:
    line = one_line_error(run_cli([*HERD, *args], tmp_path, env))
    assert line.startswith(said), line
    assert "_positive_float" not in line and "_port" not in line


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        (["--ollama-url", "http://"], {}, "herd-node: --ollama-url names no host: 'http://'"),
        (
            [],
            {"OLLAMA_HOST": "studio:11434:x"},
            "herd-node: OLLAMA_HOST='studio:11434:x' (from environment) is invalid: must look "
            "like HOST, HOST:PORT, :PORT or http://HOST:PORT",
        ),
    ],
)
def test_a_bad_backend_address_is_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], said: str
) -> None:
    command = [*NODE, "--router-url", "http://127.0.0.1:9", *args]
    assert one_line_error(run_cli(command, tmp_path, env)).startswith(said)


def test_help_is_per_command(tmp_path: Path) -> None:
    node_help = run_cli([*NODE, "--help"], tmp_path).stdout
    for option in OPTIONS:
        assert (option.flag in node_help) == ("node" in option.roles), option.flag
    assert "--local-node" not in node_help and "default 11436" in node_help
    for command in ([*HERD, "--help"], [*HERD, "serve", "--help"]):
        text = run_cli(command, tmp_path).stdout
        headings = [line for line in text.splitlines() if re.fullmatch(r"[a-z]+:", line)]
        assert headings[-3:] == ["router:", "node:", "both:"], headings
        sections = dict(zip(headings, re.split(r"^[a-z]+:$", text, flags=re.M)[1:], strict=True))
        assert "--local-node" in sections["router:"]
        for option in OPTIONS:
            heading = "both:" if len(option.roles) == 2 else f"{option.roles[0]}:"
            assert re.search(rf"^  {option.flag}\b", sections[heading], re.M), option.flag


async def test_a_node_says_once_that_it_cannot_reach_the_router(tmp_path: Path) -> None:
    """Nothing listens at the router's address: the node goes on (retrying every 0.2 s here)
    and says so in one warning, not one line per attempt."""
    router_url = f"http://127.0.0.1:{free_port()}"
    node_url = f"http://127.0.0.1:{free_port()}"
    process = await trio.lowlevel.open_process(
        [
            *NODE,
            "--router-url",
            router_url,
            "--host",
            "127.0.0.1",
            "--port",
            node_url.rsplit(":", 1)[1],
            "--heartbeat-interval",
            "0.2",
        ],
        env=clean_env(tmp_path),
        cwd=CHECKOUT,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        with trio.fail_after(30):
            async with httpx.AsyncClient(trust_env=False) as client:
                while True:
                    try:
                        status = (await client.get(node_url + "/node/status")).json()
                        if status["reconnects"] >= 4:
                            break
                    except httpx.TransportError:
                        pass
                    await trio.sleep(POLL_SECONDS)
    finally:
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            stderr = b"".join([chunk async for chunk in process.stderr]).decode()
            code = await process.wait()
    assert code == 0, stderr
    said = [line for line in stderr.splitlines() if "router" in line and "WARNING" in line]
    assert len(said) == 1, stderr
    assert f"cannot reach the router at {router_url} (connection refused)" in said[0]
    assert "--router-url" in said[0]
    assert "Traceback" not in stderr


# ---------------------------------------------------------------------------------------------
# What an operator reads: the dashboard's address, one access line per request
# ---------------------------------------------------------------------------------------------


async def run_router_with_requests(
    tmp_path: Path, sim_url: str, quiet: bool
) -> tuple[str, list[str], str]:
    """Start ``herd --local-node`` (INFO on the console), send one streamed and one whole
    request, stop it; returns its URL, the two request ids and its console output."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = clean_env(tmp_path) | {"FLEET_NODE_OLLAMA_HOST": sim_url, "FLEET_NODE_ID": "box"}
    if quiet:
        env["FLEET_QUIET"] = "true"
    process = await trio.lowlevel.open_process(
        [*HERD, "--local-node", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        cwd=CHECKOUT,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    ids: list[str] = []
    try:
        with trio.fail_after(30):
            await wait_for_status(url, lambda s: s["fleet"]["nodes_online"] == 1)
            async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
                for stream in (True, False):
                    reply = await client.post(
                        "/api/chat",
                        json={
                            "model": "llama3.2:3b",
                            "stream": stream,
                            "messages": [{"role": "user", "content": "count to twenty"}],
                            "options": {"num_predict": 20},
                        },
                    )
                    assert reply.status_code == 200
                    ids.append(reply.headers["x-herd-request-id"])
    finally:
        process.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            console = b"".join([chunk async for chunk in process.stderr]).decode()
            assert await process.wait() == 0, console
    return url, ids, console


async def test_the_router_says_where_its_dashboard_is_and_logs_each_request(
    tmp_path: Path,
) -> None:
    spec = SimConfig(name="local", models=(SimModel("llama3.2:3b"),), loaded=("llama3.2:3b",))
    async with run_sim(spec) as sim:
        url, ids, console = await run_router_with_requests(tmp_path / "loud", sim.url, False)
        _, quiet_ids, quiet_console = await run_router_with_requests(
            tmp_path / "quiet", sim.url, True
        )
    assert f"dashboard: {url}/dashboard" in console
    access = [line for line in console.splitlines() if " herd.access: " in line]
    assert len(access) == 2, console  # one per request, however many chunks it streamed
    for request_id, line in zip(ids, access, strict=True):
        assert re.search(
            rf"INFO +herd\.access: {request_id} llama3\.2:3b -> llama3\.2:3b on box: "
            r"completed 200, \d+ ms, [\d.]+ tok/s$",
            line,
        ), line
    # The JSONL file has the same as fields; with --quiet only the file has them.
    assert not [line for line in quiet_console.splitlines() if "herd.access" in line]
    for directory, expected in ((tmp_path / "loud", ids), (tmp_path / "quiet", quiet_ids)):
        records = [
            json.loads(line)
            for line in (directory / "logs" / "herd.jsonl").read_text().splitlines()
        ]
        lines = [r for r in records if r["logger"] == "herd.access"]
        assert [r["request_id"] for r in lines] == expected
        for record in lines:
            assert record["level"] == "INFO" and record["message"].startswith(record["request_id"])
            assert record["model_asked"] == record["model_served"] == "llama3.2:3b"
            assert record["node"] == "box" and record["status"] == "completed"
            assert record["http_status"] == 200
            assert record["ms"] > 0 and record["tokens_per_second"] > 0


def test_the_dashboard_line_names_a_loopback_address_for_a_wildcard_bind() -> None:
    """The router's URL (and so its ``dashboard:`` line) for a bind to every interface."""
    from herd.server import local_url

    assert local_url("http://0.0.0.0:11435") == "http://127.0.0.1:11435"
    assert local_url("http://[::]:11435") == "http://127.0.0.1:11435"
    assert local_url("http://10.0.0.5:11435") == "http://10.0.0.5:11435"


# ---------------------------------------------------------------------------------------------
# Pause without capacity learning; OLLAMA_HOST; herd status in a pipe
# ---------------------------------------------------------------------------------------------


async def test_a_node_from_ollama_host_pauses_and_resumes_without_capacity_learning(
    tmp_path: Path,
) -> None:
    """``herd-node`` with only Ollama's OLLAMA_HOST to find its backend (``0.0.0.0:PORT``, as
    ``ollama serve`` is often told to listen), no ``--learn-capacity``: ``herd node pause``
    stops fleet work there, ``herd status`` says so, ``herd node resume`` undoes it."""
    from herd.config import RouterConfig
    from herd.http.service import Router

    spec = SimConfig(name="n", models=(SimModel("llama3.2:3b"),), loaded=("llama3.2:3b",))
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path), queue_timeout=1.0)
    async with Router(config) as router, run_sim(spec) as sim:
        sim_port = sim.url.rsplit(":", 1)[1]
        env = clean_env(tmp_path / "node") | {"OLLAMA_HOST": f"0.0.0.0:{sim_port}"}
        process = await trio.lowlevel.open_process(
            [
                *NODE,
                "--router-url",
                router.url,
                "--node-id",
                "laptop",
                "--host",
                "127.0.0.1",
                "--port",
                "0",  # its own choice; the router learns the address from its heartbeat
                "--log-level",
                "WARNING",
            ],
            env=env,
            cwd=CHECKOUT,
        )

        def node() -> Any:
            return router.fleet.nodes[0].report

        async def herd(*args: str) -> subprocess.CompletedProcess[bytes]:
            return await trio.run_process(
                [*HERD, *args],
                env=env,
                cwd=CHECKOUT,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )

        async def paused_is(value: bool) -> None:
            while node().capacity.paused is not value:
                await router.state.wait_fleet_changed()

        try:
            with trio.fail_after(60):
                await router.wait_nodes(1)
                node_url = node().agent_url
                assert node_url.startswith("http://127.0.0.1:")
                assert node().backend.url == f"http://127.0.0.1:{sim_port}"
                assert node().backend.healthy and node().capacity.mode == "full"
                paused = await herd("node", "pause", "--url", node_url)
                assert paused.returncode == 0, paused.stderr
                assert paused.stdout.startswith(b"paused: the fleet sends this machine no new work")
                await paused_is(True)
                status = await herd("status", "--url", router.url)
                assert b"laptop  [online paused]" in status.stdout
                async with httpx.AsyncClient(base_url=router.url, trust_env=False) as client:
                    body = {"model": "llama3.2:3b", "prompt": "x", "stream": False}
                    refused = await client.post("/api/generate", json=body)
                    assert refused.status_code == 503 and "capacity paused" in refused.text
                    resumed = await herd("node", "resume", "--url", node_url)
                    assert resumed.returncode == 0, resumed.stderr
                    await paused_is(False)
                    assert (await client.post("/api/generate", json=body)).status_code == 200
                status = await herd("status", "--url", router.url)
                assert b"laptop  [online]" in status.stdout
        finally:
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(15):
                assert await process.wait() == 0


def test_status_words_for_paused_and_draining_nodes() -> None:
    def node(node_id: str, **fields: Any) -> dict[str, Any]:
        return {"node_id": node_id, "status": "online", "backend": {"healthy": True}, **fields}

    text = render_status(
        {
            "fleet": {"nodes_total": 3, "nodes_online": 3},
            "nodes": [
                node("a"),
                node("b", capacity={"paused": True}),
                node("c", draining=True, capacity={"paused": True}),
            ],
        }
    )
    assert "a  [online]" in text
    assert "b  [online paused]" in text
    assert "c  [online draining paused]" in text


async def test_status_into_a_pipe_closed_early_ends_quietly(tmp_path: Path) -> None:
    """``herd status | head -1``: the reader goes away after one line. The pipe here holds one
    page and the output is longer, so herd is still writing when it closes."""
    async with running_fleet(tmp_path, two_node_specs()) as fleet:

        def status_then_close() -> tuple[int, str]:
            with subprocess.Popen(
                [*HERD, "status", "--json", "--url", fleet.url],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=clean_env(tmp_path),
                cwd=CHECKOUT,
            ) as process:
                assert process.stdout is not None and process.stderr is not None
                fcntl.fcntl(process.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
                first = b""
                while not first.endswith(b"\n"):  # one line, byte by byte: no read-ahead
                    first += os.read(process.stdout.fileno(), 1)
                assert first == b"{\n"
                process.stdout.close()
                stderr = process.stderr.read().decode()
                return process.wait(timeout=30), stderr

        code, stderr = await in_thread(status_then_close)
    assert code == 0, stderr
    assert stderr == ""


# ---------------------------------------------------------------------------------------------
# herd demo
# ---------------------------------------------------------------------------------------------


def test_demo_mdns_is_off_unless_asked() -> None:
    parser = cli.demo_parser()
    assert parser.parse_args([]).mdns is False
    assert parser.parse_args(["--mdns"]).mdns is True
    assert parser.parse_args(["--mdns", "true"]).mdns is True
    assert parser.parse_args(["--mdns", "false"]).mdns is False


async def test_demo_prints_its_simulated_nodes_and_their_ports(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = await trio.lowlevel.open_process(
        [*HERD, "demo", "--port", str(port), "--log-level", "WARNING"],
        env=clean_env(tmp_path),
        cwd=CHECKOUT,
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    printed = ""
    try:
        with trio.fail_after(60):
            async for chunk in process.stdout:
                printed += chunk.decode()
                if "Ctrl-C to stop" in printed:
                    break
            async with httpx.AsyncClient(trust_env=False) as client:
                for spec in DEMO_FLEET:
                    found = re.search(
                        rf"^    {spec.name} +simulated Ollama on (http://127\.0\.0\.1:\d+)  ",
                        printed,
                        re.M,
                    )
                    assert found, printed
                    ps = (await client.get(found.group(1) + "/api/ps")).json()
                    assert {m["name"] for m in ps["models"]} == set(spec.loaded)
                settings = (await client.get(url + "/dashboard/api/settings")).json()
                assert settings["config"]["discovery"]["mdns"] is False
    finally:
        process.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            assert await process.wait() == 0
    assert f"dashboard: {url}/dashboard" in printed


async def test_a_router_open_to_the_lan_says_so_on_the_console(tmp_path: Path) -> None:
    """Bound to every interface with no fleet token and no API key, the router prints both
    warnings in a frame of ! at start. In a network namespace of its own (loopback only), so
    listening on 0.0.0.0 opens nothing to anyone."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.fail("this test needs root with unshare (util-linux); CI runs as root")
    env = clean_env(tmp_path)
    command = " ".join(f'"{part}"' for part in HERD)
    process = await trio.lowlevel.open_process(
        ["unshare", "--net", "sh", "-c", f"ip link set lo up && exec {command} --host 0.0.0.0"],
        env=env,
        cwd=CHECKOUT,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    console = b""
    try:
        with trio.fail_after(30):
            async for chunk in process.stderr:
                console += chunk
                if b"router listening on" in console:
                    break
    finally:
        process.send_signal(signal.SIGINT)
        with trio.fail_after(15):
            console += b"".join([chunk async for chunk in process.stderr])
            await process.wait()
    text = console.decode()
    assert "!" * 78 in text
    assert "listens on 0.0.0.0 with no fleet token" in text
    assert "Set FLEET_AUTH_TOKEN on the router and on every node" in text
    assert "listens on 0.0.0.0 with no API key" in text
