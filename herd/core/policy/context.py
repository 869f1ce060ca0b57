"""Context protection: don't let ``num_ctx`` reload a model that is already serving.

Ollama reloads a model when a request asks for a context window different from the loaded one;
for a large model that is a stall of seconds to minutes for every request queued behind it. So:

- the loaded window already holds the request (``num_ctx <= loaded``): strip ``num_ctx``;
- it doesn't: prefer a loaded model (the same one elsewhere, or another of the same category)
  whose window does — an *upgrade*, served where that model is loaded;
- nothing loaded fits: pass the request through as asked (the reload happens) and record it;
- the model isn't loaded where it goes: nothing to protect (the cold load uses ``num_ctx``).
"""

from __future__ import annotations

from typing import Any, Literal

from herd.core.models import NodeSnapshot

Verdict = Literal["none", "strip", "too_small"]


def verdict(requested: int | None, node: NodeSnapshot, model: str) -> Verdict:
    if not requested:
        return "none"
    loaded = node.loaded(model)
    if loaded is None or loaded.context_length <= 0:
        return "none"
    return "strip" if requested <= loaded.context_length else "too_small"


def without_num_ctx(body: dict[str, Any]) -> dict[str, Any]:
    """A copy of an Ollama body with ``options.num_ctx`` removed (the original is untouched)."""
    options = body.get("options")
    if not isinstance(options, dict) or "num_ctx" not in options:
        return body
    trimmed = {k: v for k, v in options.items() if k != "num_ctx"}
    copy = dict(body)
    if trimmed:
        copy["options"] = trimmed
    else:
        copy.pop("options")
    return copy
