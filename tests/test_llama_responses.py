"""The Responses API on a real model: llama.cpp's llama-server serving SmolLM2-135M-Instruct
behind a node with ``--backend openai``, through the router, driven by the OpenAI SDK's
``client.responses`` (whole, streamed, and continued by ``previous_response_id``)."""

from __future__ import annotations

from pathlib import Path

import openai
import trio

from herd.config import NodeConfig, RouterConfig
from herd.http.service import Router
from herd.node.service import Node
from tests.conftest import in_thread
from tests.test_llama_server import serving


async def test_responses_on_a_real_model(tmp_path: Path) -> None:
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
            with openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0) as sdk:
                response = await in_thread(
                    lambda: sdk.responses.create(
                        model="smollm2",
                        instructions="Answer in one short sentence.",
                        input="What is the capital of France?",
                        max_output_tokens=12,
                    )
                )
                assert response.output_text.strip()
                assert response.model == "smollm2:latest"
                assert response.status in ("completed", "incomplete")
                usage = response.usage
                assert usage is not None and usage.input_tokens > 10  # the template and prompt
                assert 0 < usage.output_tokens <= 12
                assert usage.total_tokens == usage.input_tokens + usage.output_tokens
                events = await in_thread(
                    lambda: list(
                        sdk.responses.create(
                            model="smollm2",
                            input="Say hello.",
                            max_output_tokens=12,
                            stream=True,
                        )
                    )
                )
                assert events[0].type == "response.created"
                assert events[-1].type in ("response.completed", "response.incomplete")
                assert [e.sequence_number for e in events] == list(range(len(events)))
                final = events[-1].response
                text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
                assert text.strip() and text == final.output_text
                assert final.usage is not None and 0 < final.usage.output_tokens <= 12
                follow_up = await in_thread(
                    lambda: sdk.responses.create(
                        model="smollm2",
                        input="And of Italy?",
                        previous_response_id=response.id,
                        max_output_tokens=8,
                    )
                )
                assert follow_up.output_text.strip()
                assert follow_up.usage is not None
                # The first turn went back to the model: a longer prompt than the first one.
                assert follow_up.usage.input_tokens > usage.input_tokens
            nursery.cancel_scope.cancel()
