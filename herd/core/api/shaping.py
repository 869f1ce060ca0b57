"""Request shaping: a client's inference request → what the router routes and what the backend gets.

Pure: no I/O, no clock. One :class:`Route` per inference endpoint says which API family the
client speaks, the request kind (its queue class), and the Ollama-native path the backend is
called on. :func:`shape` validates the body, strips herd's own extensions (``fallback_models``,
``metadata``, ``allow_substitution``), collects tags, sets ``keep_alive: -1`` unless the client
chose one, and for the OpenAI family translates the body to Ollama's native API.

Text is always streamed from the backend (``stream: true`` upstream), whatever the client asked:
the router judges a node by its first byte, and a non-streamed answer's first byte would come
only at its end. The relay assembles the one object a non-streaming client expects.

A request may refuse substitution (another model than the ones it named) with
``"allow_substitution": false`` in the body or ``X-Herd-Allow-Substitution: false``, and may
name the one node allowed to serve it with ``"metadata": {"node": "<node id>"}`` (the
dashboard's benchmarks do; so can an operator checking one machine).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from herd.core.api import anthropic, openai_compat, responses
from herd.core.errors import ApiFlavor, BadRequest, require_str
from herd.core.models import KIND_EMBED, KIND_TEXT, normalize_model_name
from herd.core.policy.conversation import continuation_keys, prefix_keys

HERD_EXTENSIONS = ("fallback_models", "metadata", "allow_substitution")
MAX_MESSAGES = 10_000  # messages in one chat request; far beyond any context window
MAX_TAGS = 16
MAX_TAG_LENGTH = 64


@attrs.frozen
class Route:
    name: str  # e.g. "ollama.chat"
    flavor: ApiFlavor
    kind: str
    upstream_path: str
    default_stream: bool


ROUTES: Mapping[str, Route] = {
    "/api/chat": Route("ollama.chat", "ollama", KIND_TEXT, "/api/chat", True),
    "/api/generate": Route("ollama.generate", "ollama", KIND_TEXT, "/api/generate", True),
    "/api/embed": Route("ollama.embed", "ollama", KIND_EMBED, "/api/embed", False),
    "/api/embeddings": Route("ollama.embeddings", "ollama", KIND_EMBED, "/api/embeddings", False),
    "/v1/chat/completions": Route("openai.chat", "openai", KIND_TEXT, "/api/chat", False),
    "/v1/completions": Route("openai.completions", "openai", KIND_TEXT, "/api/generate", False),
    "/v1/embeddings": Route("openai.embeddings", "openai", KIND_EMBED, "/api/embed", False),
    "/v1/messages": Route("anthropic.messages", "anthropic", KIND_TEXT, "/api/chat", False),
    "/v1/responses": Route("openai.responses", "openai", KIND_TEXT, "/api/chat", False),
}


def flavor_for_path(path: str) -> ApiFlavor:
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "ollama"


@attrs.frozen
class InferenceRequest:
    route: Route
    model: str  # as the client named it, normalised (``name:tag``)
    fallback_models: tuple[str, ...]
    tags: tuple[str, ...]
    stream: bool
    include_usage: bool
    # Ollama-native body for the backend, without "model" (set per attempt).
    upstream_body: dict[str, Any]
    estimated_prompt_tokens: int
    requested_context: int | None
    # False when the client refused substitution (body field or header).
    allow_substitution: bool = True
    # /v1/embeddings: how vectors go back ("float" or "base64") and how many dimensions the
    # client asked for (checked against the answer).
    embedding_format: str = "float"
    dimensions: int | None = None
    # The API module's own view of the request (Anthropic Messages, OpenAI Responses), for its
    # translators: what the Ollama body can't say (stop sequences to watch, items to echo).
    native: Any = None
    # Conversation affinity (chat only): this prompt's key, and the keys an earlier turn of the
    # same conversation may be remembered under, longest first. See herd.core.policy.conversation.
    prompt_key: str | None = None
    earlier_keys: tuple[str, ...] = ()

    # A virtual name's candidates (herd.core.policy.virtual), set by the dispatcher; empty for a
    # real model name.
    groups: tuple[tuple[str, ...], ...] = ()
    # Ollama's load and unload requests (an empty prompt or no messages; unload with
    # keep_alive 0): they go to every node that holds the model, see herd.transport.fanout.
    load_action: str | None = None
    # The model name exactly as the client sent it (traces of virtual names show it).
    asked: str = ""
    # What the model must be able to do ("vision" when the request carries images), and
    # whether it offers tools (tool-capable models are preferred where there is a choice).
    needs: frozenset[str] = frozenset()
    uses_tools: bool = False
    # ``metadata.node``: the one node allowed to serve this request (None: any).
    node: str | None = None

    @property
    def models(self) -> tuple[str, ...]:
        """The models this request may be served by, in order, without repeats: a virtual
        name's candidates, or the primary model then the fallbacks."""
        seen: dict[str, None] = {}
        names = (
            (n for g in self.groups for n in g)
            if self.groups
            else (
                self.model,
                *self.fallback_models,
            )
        )
        for name in names:
            seen.setdefault(name, None)
        return tuple(seen)


def parse_tags(body: Mapping[str, Any], header: str | None) -> tuple[str, ...]:
    """Tags from ``metadata.tags`` and the ``X-Herd-Tags`` header (comma list), deduplicated."""
    tags: list[str] = []
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise BadRequest("field 'metadata' must be an object", param="metadata")
        raw = metadata.get("tags", [])
        if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
            raise BadRequest(
                "field 'metadata.tags' must be a list of strings", param="metadata.tags"
            )
        tags.extend(raw)
    if header:
        tags.extend(header.split(","))
    cleaned: dict[str, None] = {}
    for tag in tags:
        tag = tag.strip()[:MAX_TAG_LENGTH]
        if tag:
            cleaned.setdefault(tag, None)
    return tuple(cleaned)[:MAX_TAGS]


def parse_node(body: Mapping[str, Any]) -> str | None:
    """``metadata.node``: the one node allowed to serve the request, or None."""
    metadata = body.get("metadata")
    if not isinstance(metadata, dict) or metadata.get("node") is None:
        return None
    node = metadata["node"]
    if not isinstance(node, str) or not node.strip():
        raise BadRequest("field 'metadata.node' must be a node id", param="metadata.node")
    return node.strip()


def _fallbacks(body: Mapping[str, Any]) -> tuple[str, ...]:
    raw = body.get("fallback_models", [])
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(m, str) and m.strip() for m in raw):
        raise BadRequest(
            "field 'fallback_models' must be a list of model names", param="fallback_models"
        )
    return tuple(normalize_model_name(m) for m in raw)


def _allow_substitution(body: Mapping[str, Any], header: str | None) -> bool:
    value = body.get("allow_substitution", True)
    if not isinstance(value, bool):
        raise BadRequest(
            f"field 'allow_substitution' must be true or false, got {value!r}",
            param="allow_substitution",
        )
    if header is not None:
        lowered = header.strip().lower()
        if lowered in ("false", "0", "no", "off"):
            return False
        if lowered not in ("true", "1", "yes", "on"):
            raise BadRequest(
                f"header X-Herd-Allow-Substitution must be true or false, got {header!r}",
                param="allow_substitution",
            )
    return value


def _has_images(upstream: Mapping[str, Any]) -> bool:
    if upstream.get("images"):
        return True
    messages = upstream.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and bool(m.get("images")) for m in messages
    )


def keep_alive_zero(value: Any) -> bool:
    """Is ``keep_alive`` Ollama's "unload now" (0, "0", "0s", "0m", ...)?"""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value == 0
    if isinstance(value, str):
        digits = value.strip().rstrip("smhSMH")
        try:
            return float(digits) == 0 if digits else False
        except ValueError:
            return False
    return False


def load_action(route: Route, body: Mapping[str, Any]) -> str | None:
    """``"load"``/``"unload"`` for Ollama's model-management forms of chat and generate: no
    prompt (or an empty one, no images) / no messages; ``keep_alive: 0`` unloads."""
    if route.name == "ollama.generate":
        empty = not body.get("prompt") and not body.get("images")
    elif route.name == "ollama.chat":
        empty = not body.get("messages")
    else:
        return None
    if not empty:
        return None
    return "unload" if keep_alive_zero(body.get("keep_alive")) else "load"


def _stream_flag(body: Mapping[str, Any], default: bool) -> bool:
    value = body.get("stream", default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"field 'stream' must be true or false, got {value!r}", param="stream")
    return value


def _requested_context(upstream: Mapping[str, Any]) -> int | None:
    options = upstream.get("options")
    if not isinstance(options, dict):
        return None
    num_ctx = options.get("num_ctx")
    if isinstance(num_ctx, bool) or not isinstance(num_ctx, int | float):
        return None
    return int(num_ctx) if num_ctx > 0 else None


def shape(
    route: Route,
    body: dict[str, Any],
    tags_header: str | None = None,
    substitution_header: str | None = None,
    previous: Any = None,
) -> InferenceRequest:
    """Validate and shape one inference request. Raises :class:`BadRequest` naming the field."""
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
        raise BadRequest(
            f"too many messages: {len(messages)} (the limit is {MAX_MESSAGES})", param="messages"
        )
    model = normalize_model_name(require_str(body, "model"))
    fallbacks = _fallbacks(body)
    tags = parse_tags(body, tags_header)
    node = parse_node(body)
    stream = _stream_flag(body, route.default_stream)
    allow_substitution = _allow_substitution(body, substitution_header)
    include_usage = False
    if route.flavor == "openai":
        options = body.get("stream_options")
        if isinstance(options, dict):
            include_usage = bool(options.get("include_usage"))
        native: Any = None
        if route.name == "openai.chat":
            upstream = openai_compat.chat_request_to_ollama(body)
        elif route.name == "openai.responses":
            upstream, native = responses.shape(body, previous)
        elif route.name == "openai.completions":
            upstream = openai_compat.completion_request_to_ollama(body)
        else:
            upstream = openai_compat.embeddings_request_to_ollama(body)
    elif route.flavor == "anthropic":
        upstream, native = anthropic.shape(body)
    else:
        native = None
        _validate_ollama(route, body)
        upstream = {k: v for k, v in body.items() if k not in HERD_EXTENSIONS}
    upstream.pop("model", None)
    for extension in HERD_EXTENSIONS:
        upstream.pop(extension, None)
    if route.kind == KIND_TEXT:
        upstream["stream"] = True  # see the module docstring
    else:
        upstream.pop("stream", None)
    if route.kind == KIND_TEXT or route.name == "ollama.embed" or route.name == "openai.embeddings":
        upstream.setdefault("keep_alive", -1)
    messages = upstream.get("messages") if route.kind == KIND_TEXT else None
    messages = messages if isinstance(messages, list) else []
    keys = prefix_keys(messages)
    return InferenceRequest(
        route=route,
        model=model,
        fallback_models=fallbacks,
        tags=tags,
        stream=stream if route.kind == KIND_TEXT else False,
        include_usage=include_usage,
        upstream_body=upstream,
        estimated_prompt_tokens=openai_compat.estimate_prompt_tokens(
            upstream if native is not None else body
        ),
        requested_context=_requested_context(upstream),
        allow_substitution=allow_substitution,
        load_action=load_action(route, body),
        asked=str(body.get("model", "")).strip(),
        needs=frozenset({"vision"}) if _has_images(upstream) else frozenset(),
        uses_tools=bool(upstream.get("tools")) if route.kind == KIND_TEXT else False,
        embedding_format=(
            openai_compat.embedding_format(body) if route.name == "openai.embeddings" else "float"
        ),
        dimensions=upstream.get("dimensions") if route.name == "openai.embeddings" else None,
        native=native,
        prompt_key=keys[-1] if keys else None,
        earlier_keys=tuple(continuation_keys(messages, keys)) if keys else (),
        node=node,
    )


def _validate_ollama(route: Route, body: Mapping[str, Any]) -> None:
    if route.name == "ollama.chat":
        messages = body.get("messages", [])
        if not isinstance(messages, list):
            raise BadRequest("field 'messages' must be a list", param="messages")
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise BadRequest(f"messages[{index}] must be an object", param="messages")
    elif route.name == "ollama.generate":
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise BadRequest("field 'prompt' must be a string", param="prompt")
    elif route.name == "ollama.embed":
        value = body.get("input")
        if value is None:
            raise BadRequest("missing required field 'input'", param="input")
        if not isinstance(value, str | list):
            raise BadRequest("field 'input' must be a string or a list of strings", param="input")
    elif route.name == "ollama.embeddings":
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("missing required field 'prompt' (a string)", param="prompt")
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("field 'options' must be an object", param="options")
