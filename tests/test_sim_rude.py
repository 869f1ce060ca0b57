"""The simulated Ollama is as rude as a real one: models expire, loads and pulls take time, probes
hiccup, streams pause, and requests a model can't serve are refused in Ollama's words.

All on the virtual clock (``autojump_clock``) over real HTTP on loopback.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from herd.node.backend import parse_time
from herd.sim import SimConfig, SimModel, SimOllama, run_sim
from herd.sim.server import GO_MAX_DURATION_SECONDS, go_duration, keep_alive_seconds
from tests.conftest import wait_until
from tests.streams import aiter_lines

GiB = 2**30
DEADLINE = 3600  # virtual seconds: a hang jumps straight to it


@contextlib.asynccontextmanager
async def sim_and_client(config: SimConfig) -> AsyncIterator[tuple[SimOllama, httpx.AsyncClient]]:
    # No client timeout: on the virtual clock it would fire during long loads and pauses.
    async with (
        run_sim(config) as sim,
        httpx.AsyncClient(base_url=sim.url, timeout=None, trust_env=False) as client,
    ):
        yield sim, client


def seconds_left(expires_at: str) -> float:
    """How far ahead of the wall clock an RFC 3339 ``expires_at`` is."""
    moment = dt.datetime.fromisoformat(expires_at.replace("Z", "+00:00"))
    return moment.timestamp() - time.time()


async def expiries(client: httpx.AsyncClient) -> dict[str, str]:
    response = await client.get("/api/ps")
    assert response.status_code == 200
    return {m["name"]: m["expires_at"] for m in response.json()["models"]}


async def generate(client: httpx.AsyncClient, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": "hi", "stream": False, **extra}
    return await client.post("/api/generate", json=body)


def test_keep_alive_forms_parse_as_ollama_parses_them() -> None:
    assert keep_alive_seconds(300) == 300.0
    assert keep_alive_seconds(2.5) == 2.5
    assert keep_alive_seconds(-1) == math.inf
    assert keep_alive_seconds("5m") == 300.0
    assert keep_alive_seconds("1h30m") == 5400.0
    assert keep_alive_seconds("1.5s") == 1.5
    assert keep_alive_seconds("-1m") == math.inf
    assert keep_alive_seconds("0") == 0.0
    assert go_duration("250ms") == pytest.approx(0.25)
    with pytest.raises(ValueError, match='missing unit in duration "-1"'):
        keep_alive_seconds("-1")  # Go's ParseDuration wants a unit, so Ollama refuses it
    with pytest.raises(ValueError, match='unknown unit "d"'):
        keep_alive_seconds("2d")
    with pytest.raises(ValueError, match='invalid duration ""'):
        keep_alive_seconds("")
    with pytest.raises(ValueError, match="Unsupported type: 'bool'"):
        keep_alive_seconds(True)


async def test_keep_alive_sets_expires_at_and_expired_models_leave(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = SimConfig(
        name="k",
        models=(SimModel("a:latest"), SimModel("b:latest"), SimModel("c:latest")),
        keep_alive="2m",
    )
    with trio.fail_after(4 * 3600):
        async with sim_and_client(config) as (sim, client):
            assert (await generate(client, "a", keep_alive="30s")).status_code == 200
            assert (await generate(client, "b")).status_code == 200  # the configured default
            assert (await generate(client, "c", keep_alive=-1)).status_code == 200
            ps = await expiries(client)
            assert seconds_left(ps["a:latest"]) == pytest.approx(30, abs=1)
            assert seconds_left(ps["b:latest"]) == pytest.approx(120, abs=1)
            # For ever: now plus Go's longest duration, a date some 292 years ahead (2318 when
            # Ollama's docs were written), which the node agent reads as "no expiry".
            assert int(ps["c:latest"][:4]) >= 2318
            assert seconds_left(ps["c:latest"]) == pytest.approx(GO_MAX_DURATION_SECONDS, abs=5)
            assert parse_time(ps["c:latest"]) is None
            assert parse_time(ps["a:latest"]) is not None
            await trio.sleep(29)
            ps = await expiries(client)
            assert seconds_left(ps["a:latest"]) == pytest.approx(1, abs=1)  # the wall clock agrees
            await trio.sleep(2)
            assert set(await expiries(client)) == {"b:latest", "c:latest"}  # a expired
            assert sim.expirations == 1
            # A later request sets a new deadline; keep_alive 0 unloads right after the request.
            assert (await generate(client, "b", keep_alive="1h30m")).status_code == 200
            assert seconds_left((await expiries(client))["b:latest"]) == pytest.approx(5400, abs=1)
            assert (await generate(client, "a", keep_alive=0)).status_code == 200
            # (the sim lets go of it just after the last byte, as Ollama does)
            await wait_until(lambda: sim.loaded_models == ["c:latest", "b:latest"])
            assert sim.expirations == 2 and sim.cold_loads == 4
            # Malformed keep_alive: a 400 worded as Go words it.
            bad = await generate(client, "a", keep_alive="-1")
            assert bad.status_code == 400
            assert bad.json() == {"error": 'time: missing unit in duration "-1"'}
            bad = await generate(client, "a", keep_alive=True)
            assert bad.status_code == 400 and "Unsupported type" in bad.json()["error"]
            await trio.sleep(3 * 3600)  # 3 virtual hours: b expires, c stays
            assert sim.loaded_models == ["c:latest"]
            assert sim.used_bytes() == 2 * GiB


async def test_default_keep_alive_is_five_minutes_and_preloaded_models_can_expire(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = SimConfig(
        name="d",
        models=(SimModel("d:latest"), SimModel("e:latest"), SimModel("f:latest")),
        loaded=("e:latest", "f:latest"),
        loaded_keep_alive="10s",
    )
    assert SimConfig().keep_alive == "5m" and SimConfig().loaded_keep_alive == -1
    with trio.fail_after(4 * 3600):
        async with sim_and_client(config) as (sim, client):
            assert (await generate(client, "d")).status_code == 200
            assert (await generate(client, "f")).status_code == 200  # used: 5 minutes from now
            ps = await expiries(client)
            assert seconds_left(ps["d:latest"]) == pytest.approx(300, abs=1)
            assert seconds_left(ps["e:latest"]) == pytest.approx(10, abs=1)
            assert seconds_left(ps["f:latest"]) == pytest.approx(300, abs=1)
            await trio.sleep(11)
            assert set(await expiries(client)) == {"d:latest", "f:latest"}
            await trio.sleep(290)
            assert await expiries(client) == {}
            assert sim.expirations == 3
        # Without loaded_keep_alive, preloaded models stay (tests treat them as a steady state).
        async with sim_and_client(SimConfig(models=config.models, loaded=("e:latest",))) as (
            sim,
            client,
        ):
            await trio.sleep(3 * 3600)
            assert int((await expiries(client))["e:latest"][:4]) >= 2318


async def test_load_and_unload_requests(autojump_clock: trio.testing.MockClock) -> None:
    config = SimConfig(
        name="l",
        models=(SimModel("big:latest", load_seconds=12.0), SimModel("chat:latest")),
    )
    with trio.fail_after(DEADLINE):
        async with sim_and_client(config) as (sim, client):
            start = trio.current_time()
            loaded = await client.post("/api/generate", json={"model": "big"})  # streamed or not
            assert trio.current_time() - start == pytest.approx(12.0, abs=0.01)
            assert loaded.headers["content-type"] == "application/json"
            answer = loaded.json()
            assert answer.pop("created_at")
            assert answer == {"model": "big", "response": "", "done": True, "done_reason": "load"}
            assert sim.cold_loads == 1 and sim.load_requests == 1
            start = trio.current_time()
            again = await client.post(
                "/api/generate", json={"model": "big", "prompt": "", "keep_alive": -1}
            )
            assert again.json()["done_reason"] == "load"
            assert trio.current_time() - start == pytest.approx(0.0, abs=0.01)  # already resident
            assert int((await expiries(client))["big:latest"][:4]) >= 2318
            chat = (await client.post("/api/chat", json={"model": "chat", "messages": []})).json()
            assert chat["message"] == {"role": "assistant", "content": ""}
            assert chat["done_reason"] == "load"
            assert sim.loaded_models == ["big:latest", "chat:latest"]
            # keep_alive 0 without a prompt / messages: unload.
            gone = (await client.post("/api/chat", json={"model": "chat", "keep_alive": 0})).json()
            assert gone["done_reason"] == "unload" and gone["message"]["content"] == ""
            gone = (
                await client.post("/api/generate", json={"model": "big", "keep_alive": 0})
            ).json()
            assert gone["done_reason"] == "unload" and gone["response"] == ""
            assert sim.loaded_models == []
            # Unloading what isn't resident loads nothing.
            start = trio.current_time()
            gone = (
                await client.post("/api/generate", json={"model": "big", "keep_alive": "0s"})
            ).json()
            assert gone["done_reason"] == "unload"
            assert trio.current_time() - start == pytest.approx(0.0, abs=0.01)
            assert sim.cold_loads == 2 and sim.loaded_models == []
            assert sim.load_requests == 3 and sim.unload_requests == 3
            missing = await client.post("/api/generate", json={"model": "nope"})
            assert missing.status_code == 404
            assert missing.json()["error"] == 'model "nope" not found, try pulling it first'


async def test_probe_hiccups(autojump_clock: trio.testing.MockClock) -> None:
    config = SimConfig(name="p", models=(SimModel("small:latest"),))
    with trio.fail_after(DEADLINE):
        async with sim_and_client(config) as (sim, client):
            sim.fail_probes("http500", times=2)
            assert (await client.get("/api/version")).status_code == 500
            assert (await generate(client, "small", keep_alive="5s")).status_code == 200
            assert (await client.get("/api/tags")).status_code == 500
            assert (await client.get("/api/ps")).status_code == 200  # two times only
            assert sim.probes == 3
            sim.fail("http500", times=1)  # inference failures leave probes alone
            assert (await client.get("/api/version")).status_code == 200
            assert (await generate(client, "small")).status_code == 500
            # slow: the answer comes late, and says what is true when it comes.
            sim.fail_probes("slow", times=2, seconds=7.0)
            start = trio.current_time()
            show = await client.post("/api/show", json={"model": "small"})
            assert show.status_code == 200
            assert trio.current_time() - start == pytest.approx(7.0, abs=0.01)
            assert (await generate(client, "small", keep_alive="5s")).status_code == 200
            start = trio.current_time()
            ps = (await client.get("/api/ps")).json()["models"]
            assert trio.current_time() - start == pytest.approx(7.0, abs=0.01)
            assert ps == []  # it expired while the probe was slow
            # hang: no answer, ever; inference still works meanwhile.
            sim.fail_probes("hang")
            for path in ("/api/version", "/api/tags", "/api/ps"):
                with trio.move_on_after(30) as waited:
                    await client.get(path)
                assert waited.cancelled_caught, path
            assert (await generate(client, "small")).status_code == 200
            sim.clear_probe_failure()
            assert (await client.get("/api/version")).json() == {"version": "0.12.0"}
            assert sim.probes == 10
            with pytest.raises(ValueError, match="unknown probe failure"):
                sim.fail_probes("explode")
            with pytest.raises(ValueError, match="seconds"):
                sim.fail_probes("slow")


async def read_timed(response: httpx.Response, start: float) -> list[tuple[float, dict[str, Any]]]:
    """Every NDJSON line of ``response`` with the virtual time it arrived."""
    out = []
    async with contextlib.aclosing(aiter_lines(response)) as lines:
        async for line in lines:
            if line.strip():
                out.append((round(trio.current_time() - start, 3), json.loads(line)))
    return out


async def test_pause_goes_silent_then_carries_on(autojump_clock: trio.testing.MockClock) -> None:
    config = SimConfig(name="z", models=(SimModel("slow:latest", tokens_per_second=10.0),))
    body = {"model": "slow", "prompt": "x", "options": {"num_predict": 5}}
    with trio.fail_after(DEADLINE):
        async with sim_and_client(config) as (sim, client):
            sim.fail("pause", times=1, after_chunks=2, seconds=9.0)
            start = trio.current_time()
            async with client.stream("POST", "/api/generate", json=body) as response:
                timed = await read_timed(response, start)
            assert [t for t, _ in timed] == [0.1, 0.2, 9.3, 9.4, 9.5, 9.5]
            assert timed[-1][1]["done"] is True and timed[-1][1]["eval_count"] == 5
            start = trio.current_time()
            async with client.stream("POST", "/api/generate", json=body) as response:
                timed = await read_timed(response, start)
            assert [t for t, _ in timed] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.5]  # once only
            # Not streamed: the answer is late by the pause.
            sim.fail("pause", times=1, seconds=4.0)
            start = trio.current_time()
            assert (await client.post("/api/generate", json=body | {"stream": False})).json()
            assert trio.current_time() - start == pytest.approx(4.5, abs=0.01)
            with pytest.raises(ValueError, match="seconds"):
                sim.fail("pause")


async def test_failing_before_the_first_chunk(autojump_clock: trio.testing.MockClock) -> None:
    config = SimConfig(name="y", models=(SimModel("slow:latest", tokens_per_second=10.0),))
    body = {"model": "slow", "prompt": "x", "options": {"num_predict": 3}}
    with trio.fail_after(DEADLINE):
        async with sim_and_client(config) as (sim, client):
            # stall before the first chunk: no headers either (they come with the first chunk).
            sim.fail("stall", times=1, after_chunks=0)
            with trio.move_on_after(100) as waited:
                async with client.stream("POST", "/api/generate", json=body):
                    pytest.fail("headers came without a chunk")
            assert waited.cancelled_caught
            await wait_until(lambda: sim.open_streams == 0)
            assert sim.disconnects == 1
            # die before the first chunk: the headers, then the connection drops.
            sim.fail("die_mid_stream", times=1, after_chunks=0)
            async with client.stream("POST", "/api/generate", json=body) as response:
                assert response.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError):
                    await response.aread()
            assert (await generate(client, "slow")).status_code == 200


async def test_cold_load_and_long_prefill_come_before_the_first_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    model = SimModel(
        "cold:latest", load_seconds=12.0, prefill_tokens_per_second=10.0, tokens_per_second=4.0
    )
    prompt = " ".join(["word"] * 60)  # 60 tokens at 10/s: 6 s of prefill
    body = {"model": "cold", "prompt": prompt, "options": {"num_predict": 3}, "keep_alive": 0}
    with trio.fail_after(DEADLINE):
        async with sim_and_client(SimConfig(name="c", models=(model,))) as (sim, client):
            # stream: false: nothing at all until load + prefill + 3 tokens at 4/s.
            start = trio.current_time()
            async with client.stream(
                "POST", "/api/generate", json=body | {"stream": False}
            ) as response:
                assert trio.current_time() - start == pytest.approx(12 + 6 + 0.75, abs=0.01)
                answer = json.loads(await response.aread())
            assert answer["load_duration"] == 12_000_000_000
            assert answer["prompt_eval_duration"] == 6_000_000_000
            assert answer["eval_count"] == 3 and answer["done_reason"] == "length"
            await wait_until(lambda: sim.loaded_models == [])  # keep_alive 0: right after
            # Streamed: headers come with the first chunk, after load + prefill + one token.
            start = trio.current_time()
            async with client.stream("POST", "/api/generate", json=body) as response:
                assert trio.current_time() - start == pytest.approx(12 + 6 + 0.25, abs=0.01)
                timed = await read_timed(response, start)
            assert [t for t, _ in timed] == [18.25, 18.5, 18.75, 18.75]
            assert sim.cold_loads == 2


async def test_pulls_take_time_are_cancelled_with_their_client_and_resume(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fresh = SimModel("fresh:latest", size_bytes=1_000_000_000)
    big = SimModel("big:latest", size_bytes=2_000_000_000)
    hosted = SimModel("myhost:5000/team/tool:1b", size_bytes=1_000)
    config = SimConfig(
        name="r",
        models=(SimModel("small:latest"),),
        registry=(fresh, big, hosted),
        pull_bytes_per_second=100_000_000,
    )

    async def names(client: httpx.AsyncClient) -> set[str]:
        return {t["name"] for t in (await client.get("/api/tags")).json()["models"]}

    with trio.fail_after(DEADLINE):
        async with sim_and_client(config) as (sim, client):
            # A streamed pull: progress over 10 virtual seconds; listed only once done.
            start = trio.current_time()
            seen_during: set[str] = set()
            async with client.stream("POST", "/api/pull", json={"model": "fresh"}) as response:
                timed = []
                async with contextlib.aclosing(aiter_lines(response)) as lines:
                    async for line in lines:
                        timed.append((trio.current_time() - start, json.loads(line)))
                        if timed[-1][1].get("completed") == 500_000_000:
                            seen_during = await names(client)
            assert "fresh:latest" not in seen_during
            progress = [(t, d) for t, d in timed if "completed" in d]
            assert progress[0][1] == {
                "status": f"pulling {fresh.digest[:12]}",
                "digest": f"sha256:{fresh.digest}",
                "total": 1_000_000_000,
                "completed": 0,
            }
            assert [d["completed"] for _, d in progress] == [n * 100_000_000 for n in range(11)]
            assert [round(t, 3) for t, _ in progress] == [float(n) for n in range(11)]
            assert timed[0][1] == {"status": "pulling manifest"}
            assert [d["status"] for _, d in timed[-3:]] == [
                "verifying sha256 digest",
                "writing manifest",
                "success",
            ]
            assert "fresh:latest" in await names(client)
            # A client that goes away mid-pull stops it; the bytes so far are kept.
            start = trio.current_time()
            async with client.stream("POST", "/api/pull", json={"model": "big"}) as response:
                async with contextlib.aclosing(aiter_lines(response)) as lines:
                    async for line in lines:
                        if json.loads(line).get("completed", 0) >= 500_000_000:
                            break
            await trio.sleep(60)
            assert sim.pulls_cancelled == 1
            assert "big:latest" not in await names(client)
            # The next pull resumes: 1.5 GB left at 100 MB/s.
            start = trio.current_time()
            done = await client.post("/api/pull", json={"model": "big", "stream": False})
            assert done.json() == {"status": "success"}
            assert trio.current_time() - start == pytest.approx(15.0, abs=0.01)
            # Concurrent pulls of one model share its download.
            await client.request("DELETE", "/api/delete", json={"model": "fresh"})
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                for _ in range(2):
                    nursery.start_soon(
                        functools.partial(
                            client.post, "/api/pull", json={"model": "fresh", "stream": False}
                        )
                    )
            assert trio.current_time() - start == pytest.approx(10.0, abs=0.01)
            # A name with a host part is looked up like any other; unknown names are refused.
            hosted_pull = await client.post(
                "/api/pull", json={"model": "myhost:5000/team/tool:1b", "stream": False}
            )
            assert hosted_pull.json() == {"status": "success"}
            assert "myhost:5000/team/tool:1b" in await names(client)
            unknown = await client.post(
                "/api/pull", json={"model": "myhost:5000/team/nope", "stream": False}
            )
            assert unknown.status_code == 500
            assert unknown.json() == {"error": "pull model manifest: file does not exist"}
            streamed = await client.post("/api/pull", json={"model": "nope"})
            assert streamed.status_code == 200
            assert [json.loads(line) for line in streamed.text.splitlines()] == [
                {"status": "pulling manifest"},
                {"error": "pull model manifest: file does not exist"},
            ]
            assert sim.pulls == 6  # fresh, big twice, fresh twice (one download), the hosted one
            # hang: the pull never gets past its first line.
            await client.request("DELETE", "/api/delete", json={"model": "fresh"})
            sim.fail_pulls("hang", times=1)
            first: list[dict[str, Any]] = []
            with trio.move_on_after(600) as waited:
                async with client.stream("POST", "/api/pull", json={"model": "fresh"}) as response:
                    async with contextlib.aclosing(aiter_lines(response)) as lines:
                        async for line in lines:
                            first.append(json.loads(line))
            assert waited.cancelled_caught and first == [{"status": "pulling manifest"}]
            await trio.sleep(1)
            assert sim.pulls_cancelled == 2 and "fresh:latest" not in await names(client)
            retry = await client.post("/api/pull", json={"model": "fresh", "stream": False})
            assert retry.json() == {"status": "success"}


async def test_thinking(autojump_clock: trio.testing.MockClock) -> None:
    thinker = SimModel("thinker:latest", thinking=True, thinking_tokens=3)
    config = SimConfig(name="t", models=(thinker, SimModel("plain:latest")))
    messages = [{"role": "user", "content": "why?"}]
    with trio.fail_after(DEADLINE):
        async with sim_and_client(config) as (_, client):
            chat = {"model": "thinker", "messages": messages, "options": {"num_predict": 5}}
            lines = [
                json.loads(line)
                for line in (await client.post("/api/chat", json=chat)).text.splitlines()
            ]
            assert [bool(line["message"].get("thinking")) for line in lines] == [
                True,
                True,
                True,
                False,
                False,
                False,
            ]
            assert all(line["message"]["content"] == "" for line in lines[:3])
            assert all(line["message"]["content"] for line in lines[3:5])
            assert lines[-1]["eval_count"] == 5 and lines[-1]["done_reason"] == "length"
            quiet = await client.post("/api/chat", json=chat | {"think": False})
            assert "thinking" not in quiet.text
            assert len(quiet.text.splitlines()) == 6  # five content tokens and the end
            whole = (
                await client.post(
                    "/api/generate",
                    json={"model": "thinker", "prompt": "why?", "think": True, "stream": False},
                )
            ).json()
            assert whole["thinking"] and whole["response"]
            streamed = await client.post("/api/generate", json={"model": "thinker", "prompt": "?"})
            first = json.loads(streamed.text.splitlines()[0])
            assert first["thinking"] and first["response"] == ""
            shown = (await client.post("/api/show", json={"model": "thinker"})).json()
            assert "thinking" in shown["capabilities"]
            shown = (await client.post("/api/show", json={"model": "plain"})).json()
            assert "thinking" not in shown["capabilities"]
            refused = await client.post(
                "/api/chat", json={"model": "plain", "messages": messages, "think": True}
            )
            assert refused.status_code == 400
            assert refused.json() == {"error": '"plain" does not support thinking'}
            plain = await client.post(
                "/api/chat", json={"model": "plain", "messages": messages, "think": False}
            )
            assert plain.status_code == 200 and "thinking" not in plain.text
            level = await client.post("/api/chat", json=chat | {"think": "high"})
            assert level.status_code == 400
            assert level.json() == {"error": 'think value "high" is not supported for this model'}
            odd = await client.post("/api/chat", json=chat | {"think": 3})
            assert odd.status_code == 400 and "think must be a boolean" in odd.json()["error"]


BOOKING = {
    "type": "function",
    "function": {
        "name": "book",
        "description": "Book a room",
        "parameters": {
            "type": "object",
            "required": ["city", "nights", "budget", "breakfast", "guests", "room"],
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "nights": {"type": "integer", "minimum": 1, "maximum": 14},
                "budget": {"type": "number"},
                "breakfast": {"type": "boolean"},
                "guests": {"type": "array", "items": {"type": "string"}},
                "room": {
                    "type": "object",
                    "required": ["floor"],
                    "properties": {
                        "floor": {"type": "integer"},
                        "view": {"type": ["string", "null"]},
                    },
                },
                "note": {"type": "string"},
            },
        },
    },
}


async def test_tool_calls_follow_the_schema(autojump_clock: trio.testing.MockClock) -> None:
    config = SimConfig(
        name="f", models=(SimModel("tooly:latest"), SimModel("notools:latest", tools=False))
    )
    ask = [{"role": "user", "content": "a room in Lyon please"}]
    with trio.fail_after(DEADLINE):
        async with sim_and_client(config) as (_, client):

            async def call(messages: list[dict[str, Any]]) -> dict[str, Any]:
                body = {"model": "tooly", "messages": messages, "tools": [BOOKING]}
                answer = (await client.post("/api/chat", json=body | {"stream": False})).json()
                assert answer["done"] is True
                calls = answer["message"]["tool_calls"]
                assert len(calls) == 1 and calls[0]["function"]["name"] == "book"
                assert calls[0]["id"].startswith("call_")
                arguments: dict[str, Any] = calls[0]["function"]["arguments"]
                return arguments

            args = await call(ask)
            assert set(args) == {
                "city",
                "unit",
                "nights",
                "budget",
                "breakfast",
                "guests",
                "room",
                "note",
            }
            assert isinstance(args["city"], str) and args["city"]
            assert args["unit"] in ("celsius", "fahrenheit")
            assert isinstance(args["nights"], int) and 1 <= args["nights"] <= 14
            assert isinstance(args["budget"], int | float)
            assert isinstance(args["breakfast"], bool)
            assert args["guests"] and all(isinstance(g, str) for g in args["guests"])
            assert isinstance(args["room"]["floor"], int) and isinstance(args["room"]["view"], str)
            assert await call(ask) == args  # the same prompt, the same call
            assert await call([{"role": "user", "content": "somewhere else"}]) != args
            # Streamed: the call in a chunk of its own, then the final chunk.
            body = {"model": "tooly", "messages": ask, "tools": [BOOKING]}
            lines = [
                json.loads(line)
                for line in (await client.post("/api/chat", json=body)).text.splitlines()
            ]
            assert [line["done"] for line in lines] == [False, True]
            assert lines[0]["message"]["tool_calls"][0]["function"]["arguments"] == args
            assert "tool_calls" not in lines[1]["message"]
            # After the tool's result, an answer in words: the round trip ends.
            round_trip = [
                *ask,
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": lines[0]["message"]["tool_calls"],
                },
                {"role": "tool", "content": "booked"},
            ]
            text = (
                await client.post(
                    "/api/chat", json=body | {"messages": round_trip, "stream": False}
                )
            ).json()
            assert text["message"]["content"] and "tool_calls" not in text["message"]
            # No parameters: no arguments.
            bare = {"type": "function", "function": {"name": "ping"}}
            answer = (
                await client.post("/api/chat", json=body | {"tools": [bare], "stream": False})
            ).json()
            assert answer["message"]["tool_calls"][0]["function"]["arguments"] == {}
            refused = await client.post("/api/chat", json=body | {"model": "notools"})
            assert refused.status_code == 400
            assert refused.json() == {
                "error": "registry.ollama.ai/library/notools:latest does not support tools"
            }


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


async def test_embeddings_dimensions_and_truncate(autojump_clock: trio.testing.MockClock) -> None:
    model = SimModel("nomic:latest", embedding=True, embedding_dim=768, context_length=8)
    with trio.fail_after(DEADLINE):
        async with sim_and_client(SimConfig(name="e", models=(model,))) as (_, client):

            async def embed(**body: Any) -> httpx.Response:
                return await client.post("/api/embed", json={"model": "nomic", **body})

            full = (await embed(input="a b c")).json()["embeddings"][0]
            assert len(full) == 768 and norm(full) == pytest.approx(1.0, abs=1e-4)
            assert len(set(full[:32])) > 1 and full[:32] != full[32:64]  # not one block repeated
            short = (await embed(input="a b c", dimensions=256)).json()["embeddings"][0]
            assert len(short) == 256 and norm(short) == pytest.approx(1.0, abs=1e-4)
            scale = norm(full[:256])
            assert short == pytest.approx([v / scale for v in full[:256]], abs=1e-5)
            wide = (await embed(input="a b c", dimensions=4096)).json()["embeddings"][0]
            assert wide == full
            words = [f"w{i}" for i in range(20)]
            cut = (await embed(input=" ".join(words))).json()
            assert cut["prompt_eval_count"] == 8
            same = (await embed(input=" ".join(words[:8]))).json()
            assert cut["embeddings"] == same["embeddings"]
            refused = await embed(input=" ".join(words), truncate=False)
            assert refused.status_code == 400
            assert refused.json() == {"error": "input exceeds maximum context length"}
            chat = await client.post(
                "/api/chat", json={"model": "nomic", "messages": [{"role": "user", "content": "x"}]}
            )
            assert chat.status_code == 400
            assert chat.json() == {"error": '"nomic" does not support chat'}


async def test_images_need_a_vision_model(autojump_clock: trio.testing.MockClock) -> None:
    config = SimConfig(
        name="v", models=(SimModel("eyes:latest", vision=True), SimModel("blind:latest"))
    )
    picture = {"role": "user", "content": "what is this?", "images": ["aGVyZA=="]}
    with trio.fail_after(DEADLINE):
        async with sim_and_client(config) as (sim, client):
            for model in ("blind", "eyes"):
                shown = (await client.post("/api/show", json={"model": model})).json()
                assert ("vision" in shown["capabilities"]) == (model == "eyes")
            seen = await client.post("/api/chat", json={"model": "eyes", "messages": [picture]})
            assert seen.status_code == 200
            for body in (
                {"model": "blind", "messages": [picture]},
                {"model": "blind", "messages": [picture], "stream": False},
            ):
                refused = await client.post("/api/chat", json=body)
                assert refused.status_code == 400
                assert refused.json() == {
                    "error": "this model is missing data required for image input"
                }
            refused = await client.post(
                "/api/generate",
                json={"model": "blind", "prompt": "what?", "images": ["aGVyZA=="]},
            )
            assert refused.status_code == 400
            assert "blind:latest" in sim.loaded_models  # the runner refused it, after the load
