"""A real model behind the Anthropic Messages API: llama.cpp's llama-server serving
SmolLM2-135M-Instruct (see :mod:`tests.test_llama_server`, whose ``serving`` starts it) behind a
node with ``--backend openai``, driven through the router with the official anthropic SDK."""

from __future__ import annotations

from pathlib import Path

import anthropic
import trio

from herd.config import NodeConfig, RouterConfig
from herd.core.api import anthropic as am
from herd.http.service import Router
from herd.node.service import Node
from tests.conftest import in_thread
from tests.test_llama_server import serving

ASK: list[anthropic.types.MessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


async def test_messages_through_a_real_model(tmp_path: Path) -> None:
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path / "router"))
    with trio.fail_after(300):
        async with (
            serving("smollm2") as url,
            Router(config) as router,
            trio.open_nursery() as nursery,
        ):
            node = Node(
                NodeConfig(
                    router_url=router.url,
                    ollama_url=url,
                    backend="openai",
                    node_id="llama-chat",
                    host="127.0.0.1",
                    port=0,
                    data_dir=str(tmp_path / "node"),
                )
            )
            await nursery.start(node.run)
            await router.wait_nodes(1)
            with anthropic.Anthropic(base_url=router.url, api_key="x", max_retries=0) as sdk:
                message = await in_thread(
                    lambda: sdk.messages.create(
                        model="smollm2",
                        max_tokens=12,
                        system="Answer in one short sentence.",
                        messages=ASK,
                        temperature=0.0,
                    )
                )

                def stream() -> tuple[str, anthropic.types.Message]:
                    with sdk.messages.stream(
                        model="smollm2", max_tokens=12, messages=ASK, temperature=0.0
                    ) as events:
                        return "".join(events.text_stream), events.get_final_message()

                streamed, final = await in_thread(stream)
                counted = await in_thread(
                    lambda: sdk.messages.count_tokens(model="smollm2", messages=ASK)
                )
            nursery.cancel_scope.cancel()
    assert message.model == "smollm2:latest"
    assert message.content[0].type == "text" and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    # The model's own counts, through llama-server's usage: the prompt with its chat template
    # is well over herd's characters/4 estimate of the text alone.
    _, native = am.shape({"model": "smollm2", "max_tokens": 12, "messages": ASK})
    assert message.usage.input_tokens > native.input_tokens
    assert 0 < message.usage.output_tokens <= 12
    assert streamed.strip()
    assert final.content[0].type == "text" and final.content[0].text == streamed
    assert final.stop_reason in ("end_turn", "max_tokens")
    # The stream's message_start carried the estimate; its message_delta the real count.
    assert final.usage.input_tokens > native.input_tokens
    assert 0 < final.usage.output_tokens <= 12
    assert counted.input_tokens == native.input_tokens == 8  # 30 characters
