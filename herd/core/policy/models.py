"""Model categories: which models may stand in for each other.

A substitute must do the same job: a chat model for a chat model, an embedding model for an
embedding model, a vision model for a vision model. Categories come from what the node reports
(its embedding models, each model's family) and, failing that, from the name.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from herd.core.models import NodeSnapshot, normalize_model_name

CHAT = "chat"
EMBEDDING = "embedding"
VISION = "vision"

EMBED_FAMILIES = frozenset({"bert", "nomic-bert", "xlm-roberta", "gte", "e5"})
VISION_FAMILIES = frozenset({"mllama", "llava", "clip", "qwen2vl", "qwen25vl", "gemma3-vision"})
VISION_NAME_HINTS = ("llava", "vision", "-vl", "moondream", "bakllava", "minicpm-v")
# Architectures Ollama's scheduler loads with one slot whatever OLLAMA_NUM_PARALLEL says (their
# encoder cache can't be shared between requests): Llama 3.2 Vision, Qwen3-VL.
SERIAL_FAMILIES = frozenset({"mllama", "qwen3vl", "qwen3vlmoe"})
SUGGESTIONS = 3  # closest model names named in a 404


def closest_names(model: str, names: Iterable[str]) -> tuple[str, ...]:
    """The names in ``names`` closest to ``model`` (for "did you mean ...?"), best first, at
    most :data:`SUGGESTIONS`; ``:latest`` is ignored on both sides."""
    bare = {name.removesuffix(":latest"): name for name in names}
    found = difflib.get_close_matches(model.removesuffix(":latest"), bare, SUGGESTIONS, 0.6)
    return tuple(bare[name] for name in found)


def capabilities(node: NodeSnapshot, model: str) -> tuple[str, ...]:
    """What the backend says ``model`` can do (from ``/api/show``); empty = not known."""
    available = node.available(model)
    return available.capabilities if available is not None else ()


def category(node: NodeSnapshot, model: str) -> str:
    """The category of ``model`` as ``node`` knows it: from the backend's capabilities when it
    reports them, else from the model's family and name."""
    known = capabilities(node, model)
    if known:
        if "completion" not in known and "embedding" in known:
            return EMBEDDING
        return VISION if "vision" in known else CHAT
    if model in node.report.capabilities.embed_models:
        return EMBEDDING
    available = node.available(model)
    family = available.family if available is not None else ""
    if family in EMBED_FAMILIES or "embed" in model:
        return EMBEDDING
    if family in VISION_FAMILIES or any(hint in model for hint in VISION_NAME_HINTS):
        return VISION
    return CHAT


def parameter_billions(node: NodeSnapshot, model: str) -> float:
    """The model's size in billions of parameters if the node says (``"7B"``, ``"137M"``)."""
    available = node.available(model)
    text = (available.parameter_size if available is not None else "").strip().upper()
    try:
        if text.endswith("B"):
            return float(text[:-1])
        if text.endswith("M"):
            return float(text[:-1]) / 1000
    except ValueError:
        pass
    size = available.size_bytes if available is not None else 0
    return size / 0.6e9 if size else 0.0  # about 0.6 GB per billion parameters at Q4


def model_limits(node: NodeSnapshot) -> dict[str, int]:
    """Per-model concurrency limits on ``node``: what its operator set (``--model-slots``),
    and one at a time where Ollama's scheduler runs a model so: embedding-only models and the
    architectures in :data:`SERIAL_FAMILIES`."""
    limits: dict[str, int] = {}
    if node.report.backend.kind == "ollama":
        for model in node.report.available_models:
            if model.family in SERIAL_FAMILIES or category(node, model.name) == EMBEDDING:
                limits[model.name] = 1
    for name, slots in node.report.model_slots.items():
        if slots > 0:  # named as Ollama resolves them, whoever built the node's config
            limits[normalize_model_name(name)] = slots
    return limits


def can_serve(node: NodeSnapshot, model: str, needs: frozenset[str]) -> bool:
    """Can ``model`` do what the request needs (``vision``, ...), as far as ``node`` knows?
    Unknown capabilities count as yes for everything but vision, which the category tells."""
    if not needs:
        return True
    known = capabilities(node, model)
    if known:
        return needs <= set(known)
    return "vision" not in needs or category(node, model) == VISION
