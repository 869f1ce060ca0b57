"""One error tree for herd. Every error knows its HTTP status and renders itself in the shape the
caller's API expects.

    HerdError                      base: status 500, type "server_error"
    ├── ClientError                the request is wrong (4xx); never retried
    │   ├── BadRequest             400  malformed JSON, missing or wrong-typed field
    │   ├── Unauthorized           401  missing or bad API key / fleet token
    │   ├── Forbidden              403  allowed for nobody here (a cross-site write, a
    │   │                               registry host the operator has not allowed)
    │   ├── NotFound               404  unknown path
    │   ├── ModelNotFound          404  no node has the model (naming the closest ones)
    │   ├── RequestTimeout         408  the body did not arrive in time (a slow client)
    │   ├── Conflict               409  the operator's request clashes with work in progress
    │   │                               (a benchmark already running, a pull elsewhere)
    │   ├── PayloadTooLarge        413  body over the limit
    │   └── TooManyRequests        429  one client has too many requests in progress
    ├── NodeError                  a node failed; the router may retry elsewhere
    │   ├── NodeUnreachable        connect error, broken connection before the first byte
    │   ├── NodeTimeout            no first byte in time
    │   └── NodeBadStatus          the backend answered 5xx (4xx is passed through to the client)
    └── RouterError                the router can't serve now
        ├── NoEligibleNode         503 with Retry-After: nothing can take the request
        └── Unavailable            503 with Retry-After: a router service is busy or gave up
                                        (a what-if plan already running, or over its budget)

API shapes: Ollama ``{"error": "..."}``; OpenAI ``{"error": {"message", "type", "param", "code"}}``;
Anthropic ``{"type": "error", "error": {"type", "message"}}`` with Anthropic's status codes (its
documented set: a 503 is its 529 ``overloaded_error``, other 5xx its 500 ``api_error``).
Lower-level exceptions (httpx, JSON) are mapped to these in one place each, with ``raise X from``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

ApiFlavor = Literal["ollama", "openai", "anthropic"]

# Anthropic's error types by HTTP status (https://docs.anthropic.com: "Errors").
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class HerdError(Exception):
    status: ClassVar[int] = 500
    openai_type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        return {}

    def status_for(self, flavor: ApiFlavor) -> int:
        """The HTTP status in ``flavor``'s terms (Anthropic's set is smaller)."""
        if flavor != "anthropic" or self.status in ANTHROPIC_TYPES:
            return self.status
        if self.status == 503:
            return 529
        return 500 if self.status >= 500 else 400

    def body(self, flavor: ApiFlavor) -> dict[str, Any]:
        if flavor == "anthropic":
            kind = ANTHROPIC_TYPES[self.status_for(flavor)]
            return {"type": "error", "error": {"type": kind, "message": self.message}}
        if flavor == "openai":
            return {
                "error": {
                    "message": self.message,
                    "type": self.openai_type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        return {"error": self.message}

    def render(self, flavor: ApiFlavor) -> bytes:
        return json.dumps(self.body(flavor)).encode()


class ClientError(HerdError):
    status = 400
    openai_type = "invalid_request_error"


class BadRequest(ClientError):
    status = 400
    code = "bad_request"


class Unauthorized(ClientError):
    status = 401
    openai_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ClientError):
    status = 403
    openai_type = "permission_error"
    code = "forbidden"


class NotFound(ClientError):
    status = 404
    code = "not_found"


class ModelNotFound(ClientError):
    status = 404
    code = "model_not_found"

    def __init__(
        self, model: str, *, detail: str | None = None, suggestions: tuple[str, ...] = ()
    ) -> None:
        message = f"model '{model}' not found on any node"
        if detail:
            message += f" ({detail})"
        if suggestions:
            message += "; did you mean " + " or ".join(suggestions) + "?"
        super().__init__(message, param="model")
        self.model = model
        self.suggestions = suggestions


class RequestTimeout(ClientError):
    status = 408
    code = "request_timeout"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}  # the rest of the body may still be on its way


class Conflict(ClientError):
    status = 409
    code = "conflict"


class PayloadTooLarge(ClientError):
    status = 413
    code = "payload_too_large"


class TooManyRequests(ClientError):
    status = 429
    openai_type = "rate_limit_error"
    code = "too_many_requests"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class NodeError(HerdError):
    status = 502
    openai_type = "server_error"
    code = "node_error"

    def __init__(self, message: str, *, node_id: str = "") -> None:
        super().__init__(message)
        self.node_id = node_id


class NodeUnreachable(NodeError):
    code = "node_unreachable"


class NodeTimeout(NodeError):
    status = 504
    code = "node_timeout"


class NodeBadStatus(NodeError):
    code = "node_bad_status"

    def __init__(self, message: str, *, node_id: str = "", upstream_status: int = 500) -> None:
        super().__init__(message, node_id=node_id)
        self.upstream_status = upstream_status


class RouterError(HerdError):
    status = 500


class NoEligibleNode(RouterError):
    status = 503
    openai_type = "server_error"
    code = "no_eligible_node"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


class Unavailable(RouterError):
    status = 503
    openai_type = "server_error"
    code = "unavailable"

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object request body. Raises :class:`BadRequest` naming the problem."""
    if not raw.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        # NaN, Infinity and numbers too big for a float are not JSON; nothing downstream
        # (a backend, our own re-encoding) could take them.
        data = json.loads(raw, parse_constant=_not_json, parse_float=_finite)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8: {exc.reason}") from exc
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"malformed JSON in request body: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except RecursionError as exc:
        raise BadRequest("malformed JSON in request body: nested too deeply") from exc
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(data).__name__}")
    if b"\\ud" in raw or b"\\uD" in raw:
        # A \ud800-\udfff escape decodes to a lone surrogate unless paired: valid JSON text,
        # but no UTF-8 can carry it on to a backend.
        try:
            json.dumps(data, ensure_ascii=False).encode()
        except UnicodeEncodeError as exc:
            raise BadRequest(
                "request body has an unpaired surrogate escape (\\ud800-\\udfff) in a string"
            ) from exc
    return data


def _not_json(name: str) -> Any:
    raise BadRequest(f"malformed JSON in request body: {name} is not a JSON value")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest(f"malformed JSON in request body: number {text[:40]} is out of range")
    return value


def require_str(body: Mapping[str, Any], field: str) -> str:
    """Return ``body[field]`` as a non-empty string or raise :class:`BadRequest` naming it."""
    value = body.get(field)
    if value is None:
        raise BadRequest(f"missing required field '{field}'", param=field)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(
            f"field '{field}' must be a non-empty string, got {json.dumps(value)[:80]}",
            param=field,
        )
    return value
