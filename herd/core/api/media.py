"""The image API's one request: what a client may ask of an image backend, checked. Pure.

Used by the router (to refuse a bad body before any node is asked) and by the node (to build
the backend's command line from the same checked values).
"""

from __future__ import annotations

from typing import Any

import attrs

from herd.core.errors import BadRequest


@attrs.frozen
class ImageRequest:
    model: str
    prompt: str
    width: int = 1024
    height: int = 1024
    steps: int = 4
    seed: int | None = None
    guidance: float | None = None
    negative_prompt: str | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> ImageRequest:
        """Validate a request body. Raises :class:`BadRequest` naming the field."""

        def number(name: str, default: int, low: int, high: int) -> int:
            value = body.get(name, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise BadRequest(
                    f"field '{name}' must be a whole number from {low} to {high}, got {value!r}",
                    param=name,
                )
            return value

        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("missing required field 'prompt'", param="prompt")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("missing required field 'model'", param="model")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequest("field 'seed' must be a whole number", param="seed")
        guidance = body.get("guidance")
        if guidance is not None and (
            isinstance(guidance, bool) or not isinstance(guidance, int | float)
        ):
            raise BadRequest("field 'guidance' must be a number", param="guidance")
        negative = body.get("negative_prompt")
        if negative is not None and not isinstance(negative, str):
            raise BadRequest("field 'negative_prompt' must be a string", param="negative_prompt")
        return cls(
            model=model,
            prompt=prompt,
            width=number("width", 1024, 64, 4096),
            height=number("height", 1024, 64, 4096),
            steps=number("steps", 4, 1, 200),
            seed=seed,
            guidance=guidance,
            negative_prompt=negative,
        )
