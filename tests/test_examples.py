"""Every example in examples/ runs against a live router and does what it says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

from tests.conftest import Fleet, wait_until

EXAMPLES = Path(__file__).parent.parent / "examples"


async def run(argv: list[str], fleet: Fleet | None) -> str:
    env = {**os.environ, "HERD_MODEL": "llama3.2:3b", "NO_PROXY": "*"}
    if fleet is not None:
        env["HERD_URL"] = fleet.url
    with trio.fail_after(60):
        result = await trio.run_process(
            argv, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    output = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return output


async def test_openai_example(fleet: Fleet) -> None:
    output = await run([sys.executable, str(EXAMPLES / "openai_chat.py")], fleet)
    assert "tokens:" in output
    # The router finishes its books just after the client has read the last byte.
    await wait_until(lambda: len(fleet.router.state.traces) == 2)
    assert fleet.router.state.traces[0].tags == ("examples", "openai")


async def test_ollama_example(fleet: Fleet) -> None:
    output = await run([sys.executable, str(EXAMPLES / "ollama_chat.py")], fleet)
    assert "available: llama3.2:3b" in output
    await wait_until(lambda: len(fleet.router.state.traces) == 2)


async def test_curl_example(fleet: Fleet) -> None:
    output = await run(["bash", str(EXAMPLES / "curl.sh")], fleet)
    assert "x-herd-node: alpha" in output.lower()
    assert "data: [DONE]" in output
    await wait_until(lambda: len(fleet.router.state.traces) == 2)
    assert fleet.router.state.traces[-1].tags == ("examples", "curl")


async def test_embedded_router_example() -> None:
    output = await run([sys.executable, str(EXAMPLES / "embedded_router.py")], None)
    assert "llama3.2:3b served by desk" in output
    assert "qwen2.5:0.5b served by laptop" in output


def test_examples_are_self_contained() -> None:
    # Examples import only what a user has after installing herd.
    for path in EXAMPLES.glob("*.py"):
        compile(path.read_text(), str(path), "exec")
    assert subprocess.run(["bash", "-n", str(EXAMPLES / "curl.sh")], check=False).returncode == 0
