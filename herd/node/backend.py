"""Reading the inference backend: version, loaded models, models on disk.

:meth:`OllamaBackend.probe` asks Ollama three questions at once (``/api/version``, ``/api/ps``,
``/api/tags``) under one deadline and turns the answers into our value types. It never raises
(but for cancellation): a backend that is down, slow, or talks nonsense is reported as
``healthy=False`` with a one-line reason naming the URL, and no models. The router sends an
unhealthy backend nothing; but one failed probe doesn't mean the models are gone, so the agent
reports the last good probe's lists in their place, marked stale (:func:`carry_over`).

The parsers are pure and lenient: Ollama adds fields between versions, so unknown keys are
ignored and missing ones take their defaults; an entry without a name is skipped. Every answer
is read with a limit (:data:`~herd.core.bodies.PROBE_LIMIT` for the lists,
:data:`~herd.core.bodies.SHOW_LIMIT` for ``/api/show``; :func:`herd.node.upstream.fetch`): one
over it is a failed probe, naming the limit.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
from typing import Any

import attrs
import httpx
import trio

from herd.core.bodies import PROBE_LIMIT, SHOW_LIMIT
from herd.core.errors import HerdError
from herd.core.models import AvailableModel, BackendInfo, LoadedModel
from herd.node.upstream import fetch

PROBE_TIMEOUT = 3.0
SHOW_TIMEOUT = 5.0  # seconds for the /api/show answers of models not asked about yet
SHOW_CONCURRENCY = 4
# Ollama reports "never expires" as a date far in the future; treat those as no expiry.
FAR_FUTURE = dt.datetime(2200, 1, 1, tzinfo=dt.UTC).timestamp()
ERROR_MAX_CHARS = 200
PATHS = ("/api/version", "/api/ps", "/api/tags")


@attrs.frozen
class BackendState:
    """What one probe learned: health and version, and the models (empty when unhealthy,
    until :func:`carry_over` fills in the last known ones)."""

    info: BackendInfo
    loaded: tuple[LoadedModel, ...] = ()
    available: tuple[AvailableModel, ...] = ()
    slots: int = 0  # parallel slots, when the backend says (llama-server does); 0 = unknown


def parse_time(value: Any) -> float | None:
    """RFC 3339 (with nanoseconds, ``Z`` or an offset) → epoch seconds.

    None when absent or unparsable, for Go's zero time (``0001-01-01...``) and for the
    far-future dates Ollama uses for "keep loaded forever".
    """
    if not isinstance(value, str) or not value or value.startswith("0001-"):
        return None
    text = value.strip().replace("Z", "+00:00").replace("z", "+00:00")
    if "." in text:  # fromisoformat takes at most microseconds; Go sends nanoseconds
        head, _, rest = text.partition(".")
        digits = "".join(itertools.takewhile(str.isdigit, rest))
        tz = rest[len(digits) :]
        text = f"{head}.{digits[:6]}{tz}" if digits else f"{head}{tz}"
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    try:
        epoch = moment.timestamp()
    except (OverflowError, OSError):  # year 9999 and friends on some platforms
        return None
    return None if epoch >= FAR_FUTURE else epoch


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _entries(data: Any) -> list[dict[str, Any]]:
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, list):
        return []
    return [m for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)]


def parse_ps(data: Any) -> tuple[LoadedModel, ...]:
    """Ollama ``/api/ps`` body → loaded models (names as the backend reports them)."""
    return tuple(
        LoadedModel(
            name=entry["name"],
            size_bytes=_int(entry.get("size")),
            vram_bytes=_int(entry.get("size_vram")),
            context_length=_int(entry.get("context_length")),  # absent before Ollama 0.6
            expires_at=parse_time(entry.get("expires_at")),
        )
        for entry in _entries(data)
    )


def parse_tags(data: Any) -> tuple[AvailableModel, ...]:
    """Ollama ``/api/tags`` body → models on disk."""
    out = []
    for entry in _entries(data):
        raw_details = entry.get("details")
        details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
        out.append(
            AvailableModel(
                name=entry["name"],
                size_bytes=_int(entry.get("size")),
                family=_str(details.get("family")),
                parameter_size=_str(details.get("parameter_size")),
                quantization=_str(details.get("quantization_level")),
                modified_at=_str(entry.get("modified_at")),
                digest=_str(entry.get("digest")),
                parent_model=_str(details.get("parent_model")),
            )
        )
    return tuple(out)


class _BadAnswer(Exception):
    """A backend answer that failed or isn't JSON (only ever caught inside
    :meth:`OllamaBackend.probe`)."""


def _describe(url: str, exc: BaseException) -> str:
    """One short line for ``BackendInfo.error``: which URL, what went wrong."""
    if isinstance(exc, _BadAnswer):
        text = str(exc)
    elif isinstance(exc, HerdError):
        text = f"{url}: {exc.message}"
    else:
        where = exc.request.url if isinstance(exc, httpx.RequestError) else url
        detail = str(exc).splitlines()[0] if str(exc) else ""
        text = f"{where}: {type(exc).__name__}" + (f": {detail}" if detail else "")
    return text[:ERROR_MAX_CHARS]


def _strip_slash(url: str) -> str:
    return url.rstrip("/")


@attrs.define(eq=False)
class OllamaBackend:
    """An Ollama server read through a client the caller owns (and closes)."""

    url: str = attrs.field(converter=_strip_slash)
    client: httpx.AsyncClient
    # The whole probe's deadline; also each request's transport timeout.
    timeout: float = PROBE_TIMEOUT
    # (name, digest) -> capabilities from /api/show, asked once per model version.
    _capabilities: dict[tuple[str, str], tuple[str, ...]] = attrs.field(factory=dict, init=False)

    async def probe(self) -> BackendState:
        """Read version, ps and tags concurrently, within ``timeout`` seconds.

        Raises nothing but ``trio.Cancelled``: any failure is reported in the result as
        ``healthy=False`` with the reason.
        """
        results: dict[str, Any] = {}
        request_timeout = httpx.Timeout(self.timeout)

        async def get(path: str) -> None:
            status, raw = await fetch(
                self.client,
                "GET",
                self.url + path,
                limit=PROBE_LIMIT,
                what=f"a {path} answer",
                timeout=request_timeout,
            )
            if status != 200:
                raise _BadAnswer(f"{self.url}{path}: HTTP {status}")
            try:
                results[path] = json.loads(raw)
            except ValueError as exc:
                raise _BadAnswer(f"{self.url}{path}: answer is not JSON ({exc})") from exc

        error: str | None = None
        try:
            with trio.move_on_after(self.timeout) as deadline:
                async with trio.open_nursery() as nursery:
                    for path in PATHS:
                        nursery.start_soon(get, path)
        except* (httpx.HTTPError, httpx.InvalidURL, _BadAnswer, HerdError) as group:
            # The first failure is the cause; the others were cancelled by it or are the
            # same story.
            error = _describe(self.url, group.exceptions[0])
        if deadline.cancelled_caught:
            error = f"{self.url}: no answer within {self.timeout:g} s"
        if error is not None:
            return BackendState(
                info=BackendInfo(kind="ollama", url=self.url, healthy=False, error=error)
            )
        version = results["/api/version"]
        return BackendState(
            info=BackendInfo(
                kind="ollama",
                url=self.url,
                version=_str(version.get("version")) if isinstance(version, dict) else "",
                healthy=True,
            ),
            loaded=parse_ps(results["/api/ps"]),
            available=await self.with_capabilities(parse_tags(results["/api/tags"])),
        )

    async def with_capabilities(
        self, available: tuple[AvailableModel, ...]
    ) -> tuple[AvailableModel, ...]:
        """``available`` with each model's capabilities from ``/api/show``, asked once per
        model version (name and digest) and cached; a model whose answer didn't come (in
        :data:`SHOW_TIMEOUT`, :data:`SHOW_CONCURRENCY` at a time) is asked again next time."""
        wanted = [(m.name, m.digest) for m in available]
        missing = [key for key in wanted if key not in self._capabilities]
        if missing:
            limit = trio.Semaphore(SHOW_CONCURRENCY)

            async def show(key: tuple[str, str]) -> None:
                async with limit:
                    with contextlib.suppress(httpx.HTTPError, ValueError, HerdError):
                        status, raw = await fetch(
                            self.client,
                            "POST",
                            self.url + "/api/show",
                            limit=SHOW_LIMIT,
                            what="a model description",
                            json={"model": key[0]},
                            timeout=SHOW_TIMEOUT,
                        )
                        data = json.loads(raw) if status == 200 else None
                        listed = data.get("capabilities") if isinstance(data, dict) else None
                        if isinstance(listed, list):
                            self._capabilities[key] = tuple(
                                str(c) for c in listed if isinstance(c, str)
                            )

            with trio.move_on_after(SHOW_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    for key in missing:
                        nursery.start_soon(show, key)
        current = set(wanted)
        for key in [k for k in self._capabilities if k not in current]:
            del self._capabilities[key]  # deleted or replaced models
        return tuple(
            attrs.evolve(m, capabilities=self._capabilities.get((m.name, m.digest), ()))
            for m in available
        )


def carry_over(state: BackendState, known: BackendState | None) -> BackendState:
    """``state`` as the heartbeat should report it. A failed probe (``healthy=False``) keeps
    its health and error but takes the lists and slots of ``known``, the last good probe's
    state, with ``models_stale=True``. A good probe, or a failed one with nothing known (the
    backend never answered), is reported as it is."""
    if state.info.healthy or known is None:
        return state
    return BackendState(
        info=attrs.evolve(state.info, models_stale=True),
        loaded=known.loaded,
        available=known.available,
        slots=known.slots,
    )
