"""Reasoning on the OpenAI chat path: Ollama's message.thinking reaches OpenAI clients as the
``reasoning`` field (messages and stream deltas), as Ollama's own /v1 names it; and
``reasoning_effort`` becomes Ollama's ``think``."""

from __future__ import annotations

from pathlib import Path

import openai
from openai.types.chat import ChatCompletionMessageParam

from herd.core.api import chat
from herd.sim import SimConfig, SimModel
from tests.conftest import GiB, in_thread, running_fleet

THINKER = SimModel("qwen3:8b", size_bytes=GiB, thinking=True, thinking_tokens=4)
LEVELS = SimModel("gpt-oss:20b", size_bytes=GiB, thinking=True, thinking_tokens=2)


async def test_thinking_reaches_the_openai_sdk(tmp_path: Path) -> None:
    spec = SimConfig(name="solo", models=(THINKER, LEVELS), loaded=("qwen3:8b",))
    async with running_fleet(tmp_path, [spec]) as fleet:
        with openai.OpenAI(base_url=fleet.url + "/v1", api_key="x", max_retries=0) as sdk:
            messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "why?"}]
            whole = await in_thread(
                lambda: sdk.chat.completions.create(model="qwen3:8b", messages=messages)
            )
            message = whole.choices[0].message
            assert message.content and (message.model_extra or {})["reasoning"]

            def stream() -> tuple[str, str]:
                reasoning, content = "", ""
                for chunk in sdk.chat.completions.create(
                    model="qwen3:8b", messages=messages, stream=True
                ):
                    if chunk.choices:
                        delta = chunk.choices[0].delta
                        reasoning += (delta.model_extra or {}).get("reasoning") or ""
                        content += delta.content or ""
                return reasoning, content

            reasoning, content = await in_thread(stream)
            assert reasoning == (message.model_extra or {})["reasoning"]
            assert content == message.content
            # reasoning_effort: "none" turns thinking off; a level is sent as is to a model
            # that takes levels, as true to one that doesn't.
            off = await in_thread(
                lambda: sdk.chat.completions.create(
                    model="qwen3:8b", messages=messages, reasoning_effort="none"
                )
            )
            assert not (off.choices[0].message.model_extra or {}).get("reasoning")
            assert fleet.sims["solo"].requests[-1][1]["think"] is False
            await in_thread(
                lambda: sdk.chat.completions.create(
                    model="qwen3:8b", messages=messages, reasoning_effort="high"
                )
            )
            assert fleet.sims["solo"].requests[-1][1]["think"] is True
            await in_thread(
                lambda: sdk.chat.completions.create(
                    model="gpt-oss:20b", messages=messages, reasoning_effort="high"
                )
            )
            assert fleet.sims["solo"].requests[-1][1]["think"] == "high"


def test_effort_and_levels() -> None:
    assert chat.effort_to_think(None, "f") is None
    assert chat.effort_to_think("none", "f") is False
    assert chat.effort_to_think("minimal", "f") == "low"
    assert chat.think_for_model("medium", "gpt-oss:120b") == "medium"
    assert chat.think_for_model("medium", "deepseek-r1:8b") is True
    assert chat.think_for_model(True, "x") is True
