"""Reading the inference backend: version, loaded models, models on disk."""

from __future__ import annotations

import datetime as dt
from typing import Any

import attrs
import httpx
import trio

from herd.models import AvailableModel, BackendInfo, LoadedModel

PROBE_TIMEOUT = 3.0
# Ollama reports "never expires" as a date far in the future; treat those as no expiry.
FAR_FUTURE = dt.datetime(2200, 1, 1, tzinfo=dt.UTC).timestamp()


@attrs.frozen
class BackendState:
    info: BackendInfo
    loaded: tuple[LoadedModel, ...] = ()
    available: tuple[AvailableModel, ...] = ()


def parse_time(value: Any) -> float | None:
    """RFC 3339 (with nanoseconds, ``Z`` or an offset) → epoch seconds; None if absent/odd."""
    if not isinstance(value, str) or not value or value.startswith("0001-"):
        return None
    text = value.replace("Z", "+00:00")
    if "." in text:  # trim fractional seconds beyond microseconds
        head, _, rest = text.partition(".")
        digits = "".join(ch for ch in rest if ch.isdigit())
        tz = rest[len(digits) :]
        text = f"{head}.{digits[:6]}{tz}"
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    epoch = moment.timestamp()
    return None if epoch >= FAR_FUTURE else epoch


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def parse_ps(data: Any) -> tuple[LoadedModel, ...]:
    models = data.get("models") if isinstance(data, dict) else None
    out = []
    for entry in models if isinstance(models, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        out.append(
            LoadedModel(
                name=entry["name"],
                size_bytes=_int(entry.get("size")),
                vram_bytes=_int(entry.get("size_vram")),
                context_length=_int(entry.get("context_length")),
                expires_at=parse_time(entry.get("expires_at")),
            )
        )
    return tuple(out)


def parse_tags(data: Any) -> tuple[AvailableModel, ...]:
    models = data.get("models") if isinstance(data, dict) else None
    out = []
    for entry in models if isinstance(models, list) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        raw_details = entry.get("details")
        details: dict[str, Any] = raw_details if isinstance(raw_details, dict) else {}
        out.append(
            AvailableModel(
                name=entry["name"],
                size_bytes=_int(entry.get("size")),
                family=str(details.get("family") or ""),
                parameter_size=str(details.get("parameter_size") or ""),
                quantization=str(details.get("quantization_level") or ""),
                modified_at=str(entry.get("modified_at") or ""),
                digest=str(entry.get("digest") or ""),
            )
        )
    return tuple(out)


@attrs.define(eq=False)
class OllamaBackend:
    url: str
    client: httpx.AsyncClient

    async def probe(self) -> BackendState:
        """Read version, ps and tags concurrently. Never raises (but for cancellation): a
        backend that doesn't answer is reported unhealthy with the reason."""
        results: dict[str, Any] = {}

        async def get(path: str) -> None:
            response = await self.client.get(self.url + path, timeout=PROBE_TIMEOUT)
            response.raise_for_status()
            results[path] = response.json()

        error: str | None = None
        try:
            async with trio.open_nursery() as nursery:
                for path in ("/api/version", "/api/ps", "/api/tags"):
                    nursery.start_soon(get, path)
        except* (httpx.HTTPError, ValueError) as group:
            first = group.exceptions[0]
            error = f"{self.url}: {type(first).__name__}: {first}"[:300]
        if error is not None:
            return BackendState(
                info=BackendInfo(kind="ollama", url=self.url, healthy=False, error=error)
            )
        version = results["/api/version"]
        return BackendState(
            info=BackendInfo(
                kind="ollama",
                url=self.url,
                version=str(version.get("version", "")) if isinstance(version, dict) else "",
                healthy=True,
            ),
            loaded=parse_ps(results["/api/ps"]),
            available=parse_tags(results["/api/tags"]),
        )
