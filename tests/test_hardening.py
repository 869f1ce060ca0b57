"""Hostile and unlucky conditions on the real HTTP path: settings and their effects, request
heads, WebSocket handshakes to HTTP routes, error headers, incomplete streams, a backend probe
that fails once, a client gone during connect, missing capabilities, bounded metrics, a trace
store that can't write, a data directory that can't be used."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import socket
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import attrs
import httpx
import openai
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionRejected, wrap_client_stream

from herd.core import traces
from herd.node.agent import AgentConfig, NodeAgent
from herd.sim import SimConfig, SimModel, run_sim
from herd.state.settings import RuntimeSettings
from tests.conftest import (
    EMBED,
    LLAMA_3B,
    GiB,
    in_thread,
    running_fleet,
    two_node_specs,
    wait_until,
)

SLOW = SimModel("slow:latest", size_bytes=GiB, tokens_per_second=10.0)


def chat(model: str = "llama3.2:3b", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


@contextlib.asynccontextmanager
async def client_for(url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=url, timeout=None, trust_env=False) as client:
        yield client


async def test_a_new_stale_timeout_takes_effect_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spec = SimConfig(name="solo", models=(SLOW,), loaded=("slow:latest",))
    async with running_fleet(tmp_path, [spec]) as fleet, client_for(fleet.url) as client:
        await trio.sleep(1)  # the reaper is asleep on the old 600 s timeout
        changed = await client.post("/dashboard/api/settings", json={"stale_timeout": 5})
        assert changed.status_code == 200
        fleet.sims["solo"].fail("stall", times=1, after_chunks=3)
        start = trio.current_time()
        stalled = await client.post("/api/generate", json={"model": "slow", "prompt": "x"})
        assert "no progress" in stalled.text.splitlines()[-1]
        assert trio.current_time() - start <= 5 + 5 / 4 + 1  # not 150 s (a quarter of 600)


async def test_settings_are_checked_and_written_only_as_json_from_this_site(
    tmp_path: Path,
) -> None:
    async with running_fleet(tmp_path, two_node_specs()) as fleet, client_for(fleet.url) as client:
        zero = await client.post("/dashboard/api/settings", json={"stale_timeout": 0})
        assert zero.status_code == 400
        assert "between 5 and 86400" in zero.json()["error"]
        half = await client.post("/dashboard/api/settings", json={"prewarm_queue_depth": 2.5})
        assert half.status_code == 400 and "whole number" in half.json()["error"]
        form = await client.post(
            "/dashboard/api/settings",
            content=b"auto_pull=true",
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
        assert form.status_code == 415
        plain = await client.post(
            "/dashboard/api/settings", content=b'{"auto_pull": true}', headers={}
        )
        assert plain.status_code == 415
        elsewhere = await client.post(
            "/dashboard/api/settings",
            json={"auto_pull": True},
            headers={"Origin": "https://evil.example"},
        )
        assert elsewhere.status_code == 403
        fetch_site = await client.post(
            "/dashboard/api/settings",
            json={"auto_pull": True},
            headers={"Sec-Fetch-Site": "cross-site"},
        )
        assert fetch_site.status_code == 403
        for path in ("/dashboard/api/pull", "/dashboard/api/delete", "/dashboard/api/benchmarks"):
            refused = await client.post(path, json={}, headers={"Origin": "http://evil.example"})
            assert refused.status_code == 403, path
        assert fleet.router.state.settings.auto_pull is False
        host = fleet.url.removeprefix("http://")
        same = await client.post(
            "/dashboard/api/settings", json={"auto_pull": True}, headers={"Origin": fleet.url}
        )
        assert same.status_code == 200, (host, same.text)
        assert fleet.router.state.settings.auto_pull is True


def raw_request(url: str, head: bytes) -> bytes:
    """Send ``head`` in one write on a fresh socket; the whole answer (the router closes)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_request_heads_are_bounded_even_in_one_read(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, two_node_specs()) as fleet:
        big = b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
        answer = await trio.to_thread.run_sync(raw_request, fleet.url, big)
        assert answer.startswith(b"HTTP/1.1 431")
        many = b"GET /api/tags HTTP/1.1\r\nHost: x\r\n" + b"".join(
            b"X-H%d: v\r\n" % i for i in range(3000)
        )
        answer = await trio.to_thread.run_sync(raw_request, fleet.url, many + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431")
        assert b"3001 request headers; the limit is 100" in answer
        async with client_for(fleet.url) as client:
            fine = await client.get("/api/tags", headers={"X-Fine": "a" * 10_000})
            assert fine.status_code == 200


@pytest.mark.parametrize("keys", [(), ("sk-1",)])
async def test_a_websocket_handshake_to_an_http_route_is_refused(
    tmp_path: Path, keys: tuple[str, ...]
) -> None:
    async with running_fleet(tmp_path, two_node_specs(), api_keys=keys) as fleet:
        host, port = fleet.url.removeprefix("http://").split(":")
        for path in ("/fleet/status", "/metrics", "/api/chat", "/dashboard/events"):
            assert await handshake_status(host, int(port), path) == 403, path


async def handshake_status(host: str, port: int, path: str) -> int | None:
    """The HTTP status a WebSocket handshake to ``path`` is refused with (None: accepted)."""
    # The stream is ours to close: a refused handshake leaves trio-websocket's own open.
    stream = await trio.open_tcp_stream(host, port)
    statuses: list[int] = []
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                ws = await wrap_client_stream(nursery, stream, f"{host}:{port}", path)
                await ws.aclose()
    except* ConnectionRejected as group:
        statuses += [e.status_code for e in group.exceptions if isinstance(e, ConnectionRejected)]
    finally:
        await stream.aclose()
    return statuses[0] if statuses else None


async def test_error_responses_say_how_many_retries_and_where(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, two_node_specs()) as fleet, client_for(fleet.url) as client:
        for sim in fleet.sims.values():
            sim.fail("http500", times=1)
        failed = await client.post("/api/generate", json={"model": "llama3.2:3b", "prompt": "x"})
        assert failed.status_code == 502
        assert failed.headers["x-herd-retries"] == "1"
        assert failed.headers["x-herd-node"] in ("alpha", "beta")
        missing = await client.post("/api/generate", json={"model": "nope", "prompt": "x"})
        assert missing.headers["x-herd-retries"] == "0"


async def test_an_incomplete_stream_counts_the_tokens_that_reached_the_client(
    tmp_path: Path,
) -> None:
    spec = SimConfig(name="solo", models=(LLAMA_3B,), loaded=("llama3.2:3b",))
    async with running_fleet(tmp_path, [spec]) as fleet, client_for(fleet.url) as client:
        fleet.sims["solo"].fail("die_mid_stream", times=2, after_chunks=5)
        ollama = await client.post("/api/chat", json=chat())
        *tokens, last = [json.loads(line) for line in ollama.text.splitlines()]
        assert "error" in last and tokens
        openai_shape = await client.post("/v1/chat/completions", json=chat(stream=True))
        assert "stream_interrupted" in openai_shape.text
        deltas = [
            line
            for line in openai_shape.text.splitlines()
            if '"content":"' in line and '""' not in line
        ]
        assert deltas
        await wait_until(lambda: len(fleet.router.state.traces) == 2)
        first, second = fleet.router.state.traces
        assert (first.status, second.status) == (traces.INCOMPLETE, traces.INCOMPLETE)
        # What reached the client is counted, not left null.
        assert first.completion_tokens == len(tokens)
        assert second.completion_tokens == len(deltas)


async def test_a_failed_probe_is_not_a_missing_model(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spec = SimConfig(name="solo", models=(LLAMA_3B,), loaded=("llama3.2:3b",))
    settings = RuntimeSettings(auto_pull=True)  # a missing model would be pulled: it isn't
    async with (
        running_fleet(tmp_path, [spec], settings) as fleet,
        client_for(fleet.url) as client,
    ):
        sim = fleet.sims["solo"]
        sim.fail_probes("http500", times=3)  # version, ps and tags of one heartbeat
        fleet.agents["solo"].wake()
        with trio.fail_after(10):
            while fleet.router.fleet.nodes[0].report.backend.healthy:
                await fleet.router.state.wait_fleet_changed()
        node = fleet.router.fleet.nodes[0]
        assert node.report.backend.healthy is False
        assert node.report.backend.models_stale is True
        assert node.has_model("llama3.2:3b")  # last known, kept
        start = trio.current_time()
        reply = await client.post("/api/chat", json=chat(stream=False))
        assert reply.status_code == 200  # waited for the next good heartbeat, no 404
        assert trio.current_time() - start <= 5 + 1
        assert sim.pulls == 0


async def test_a_client_gone_while_connecting_is_a_disconnect_not_a_node_failure(
    tmp_path: Path,
) -> None:
    # A backend whose port takes no more connections: the listen backlog is full, so a
    # connect hangs in the kernel (a node behind a stalled link looks like this).
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    spec = SimConfig(name="solo", models=(LLAMA_3B,), loaded=("llama3.2:3b",))
    try:
        async with run_sim(spec) as sim, running_fleet(tmp_path, []) as fleet:
            agent = NodeAgent(
                AgentConfig(
                    router_url=fleet.url,
                    ollama_url=sim.url,
                    node_id="stuck",
                    advertise_url=f"http://127.0.0.1:{port}",
                )
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(agent.run)
                with trio.fail_after(10):
                    await fleet.router.wait_nodes(1)
                async with client_for(fleet.url) as client:
                    with trio.move_on_after(10):
                        async with trio.open_nursery() as requests:
                            requests.start_soon(
                                functools.partial(client.post, "/api/chat", json=chat())
                            )
                            await wait_until(
                                lambda: fleet.router.state.queues.statistics().in_flight == 1
                            )
                            requests.cancel_scope.cancel()  # the client goes away
                await wait_until(fleet.counters_idle)
                await wait_until(lambda: len(fleet.router.state.traces) == 1)
                (trace,) = fleet.router.state.traces
                assert trace.status == traces.CLIENT_DISCONNECTED
                assert fleet.router.state.queues.statistics().failed == 0
                nursery.cancel_scope.cancel()
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_media_nobody_can_do_is_refused_at_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running_fleet(tmp_path, two_node_specs()) as fleet, client_for(fleet.url) as client:
        start = trio.current_time()
        stt = await client.post(
            "/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF....")}, data={}
        )
        assert stt.status_code == 503
        assert "no node in the fleet transcribes speech" in stt.json()["error"]["message"]
        image = await client.post("/api/generate-image", json={"model": "z-image", "prompt": "x"})
        assert image.status_code == 503  # no node generates images at all
        assert "no node in the fleet generates images" in image.json()["error"]
        openai_image = await client.post(
            "/v1/images/generations", json={"model": "z-image", "prompt": "x"}
        )
        assert openai_image.status_code == 503
        assert "generates images" in openai_image.json()["error"]["message"]
        assert trio.current_time() - start < 1


async def test_metrics_series_are_labelled_by_models_the_fleet_has(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, two_node_specs()) as fleet, client_for(fleet.url) as client:
        for index in range(20):
            await client.post("/api/generate", json={"model": f"invented-{index}", "prompt": "x"})
        await client.post("/api/generate", json={"model": "llama3.2:3b", "prompt": "x"})
        await wait_until(lambda: len(fleet.router.state.traces) == 21)
        text = (await client.get("/metrics")).text
        assert "invented" not in text
        assert 'model="(other)"' in text and 'model="llama3.2:3b"' in text


async def test_embeddings_as_the_openai_api_defines_them(tmp_path: Path) -> None:
    big = attrs.evolve(EMBED, embedding_dim=768)
    spec = SimConfig(name="solo", models=(LLAMA_3B, big), loaded=())
    async with running_fleet(tmp_path, [spec]) as fleet, client_for(fleet.url) as client:
        body = {"model": "nomic-embed-text", "input": ["one", "two"]}
        floats = (await client.post("/v1/embeddings", json=body)).json()["data"]
        assert len(floats[0]["embedding"]) == 768
        packed = (
            await client.post("/v1/embeddings", json={**body, "encoding_format": "base64"})
        ).json()["data"]
        raw = base64.b64decode(packed[1]["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
        assert decoded == pytest.approx(floats[1]["embedding"], abs=1e-6)
        # The OpenAI SDK asks for base64 and decodes it: the same vectors.
        with openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0) as sdk:
            result = await in_thread(
                lambda: sdk.embeddings.create(model="nomic-embed-text", input=["one", "two"])
            )
        assert result.data[0].embedding == pytest.approx(floats[0]["embedding"], abs=1e-6)
        short = (await client.post("/v1/embeddings", json={**body, "dimensions": 64})).json()
        assert len(short["data"][0]["embedding"]) == 64
        assert sum(v * v for v in short["data"][0]["embedding"]) == pytest.approx(1, abs=1e-4)
        too_many = await client.post("/v1/embeddings", json={**body, "dimensions": 4096})
        assert too_many.status_code == 400 and "dimensions" in too_many.json()["error"]["message"]
        tokens = await client.post("/v1/embeddings", json={**body, "input": [[1, 2, 3]]})
        assert tokens.status_code == 400 and "token id" in tokens.json()["error"]["message"]
        odd = await client.post("/v1/embeddings", json={**body, "encoding_format": "hex"})
        assert odd.status_code == 400 and "encoding_format" in odd.json()["error"]["message"]


async def test_a_trace_store_that_cannot_write_stops_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="herd.store")
    async with running_fleet(tmp_path, two_node_specs()) as fleet, client_for(fleet.url) as client:
        store = fleet.router.store
        assert store is not None
        # The database may grow no more (SQLite then fails writes as on a full disk, with
        # "database or disk is full").
        store.max_bytes = 1
        for _ in range(40):
            reply = await client.post("/api/chat", json=chat(stream=False))
            assert reply.status_code == 200  # routing goes on
        with trio.fail_after(10):
            overview = await client.get("/dashboard/api/overview")  # flush doesn't wedge
        assert overview.status_code == 200
        await wait_until(lambda: store.failed > 0)
        health = (await client.get("/dashboard/api/health")).json()
        storage = next(c for c in health["checks"] if c["id"] == "storage")
        assert storage["severity"] == "critical" and "full" in storage["evidence"]
        metrics = (await client.get("/metrics")).text
        assert 'herd_traces_total{outcome="failed"}' in metrics
    errors = [r for r in caplog.records if r.name == "herd.store"]
    assert len(errors) == 1  # once per minute, not once per batch


def test_a_data_directory_that_cannot_be_used_is_one_line_and_exit_2(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    for data_dir in (not_a_dir, not_a_dir / "below"):
        result = subprocess.run(
            [sys.executable, "-m", "herd.cli", "--data-dir", str(data_dir), "--mdns", "false"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(not_a_dir) in lines[0], result.stderr
        assert "Traceback" not in result.stderr
    broken = tmp_path / "broken"
    (broken / "latency.db").mkdir(parents=True)  # a directory where the database should be
    result = subprocess.run(
        [sys.executable, "-m", "herd.cli", "--data-dir", str(broken), "--mdns", "false"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "cannot use the trace database" in result.stderr and "Traceback" not in result.stderr


async def test_a_long_pause_mid_stream_is_not_cut(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spec = SimConfig(name="solo", models=(SLOW,), loaded=("slow:latest",))
    async with running_fleet(tmp_path, [spec]) as fleet, client_for(fleet.url) as client:
        fleet.sims["solo"].fail("pause", times=1, after_chunks=3, seconds=45)
        start = trio.current_time()
        for path in ("/api/generate", "/v1/completions"):
            reply = await client.post(
                path, json={"model": "slow", "prompt": "x", "stream": path == "/api/generate"}
            )
            assert reply.status_code == 200
            assert "error" not in reply.text
        assert trio.current_time() - start >= 45
        await wait_until(lambda: len(fleet.router.state.traces) == 2)
        assert [t.status for t in fleet.router.state.traces] == [traces.COMPLETED] * 2


def test_a_log_file_that_cannot_be_written_is_reported_once_not_per_record(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """/dev/full fails every write with ENOSPC: a full disk, for real."""
    from herd.logs import _file_handler

    if not Path("/dev/full").exists():  # Linux has it; this is the only way to fill a disk here
        pytest.fail("/dev/full is needed for this test (a Linux device)")
    handler = _file_handler(Path("/dev/full"))
    logger = logging.getLogger("herd.test.full")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        for index in range(50):
            logger.error("record %d", index)
    finally:
        logger.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err
    lines = [line for line in err.splitlines() if "cannot write the log file /dev/full" in line]
    assert len(lines) == 1 and "No space left on device" in lines[0]


async def test_a_settings_file_that_breaks_a_rule_is_ignored_saying_which(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A settings.json edited by hand with a value the dashboard would refuse: the router starts
    on its defaults (never on the bad value: a stale_timeout of 0 would spin the reaper) and
    says which file and which rule; a file that isn't JSON is the same."""
    for text, rule in (
        ('{"stale_timeout": 0, "auto_pull": true}', "between 5 and 86400"),
        ('{"stale_timeout": ', "settings.json"),
        ("[1, 2]", "not a JSON object"),
    ):
        caplog.clear()
        (tmp_path / "settings.json").write_text(text)
        async with running_fleet(tmp_path, two_node_specs()) as fleet:
            settings = fleet.router.state.settings
            assert (settings.stale_timeout, settings.auto_pull) == (600.0, False)
        (warning,) = [r for r in caplog.records if "ignoring the settings" in r.message]
        assert str(tmp_path / "settings.json") in warning.message and rule in warning.message
