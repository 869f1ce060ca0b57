"""The one cattrs converter: (de)serialisation of our attrs values at the edges.

Heartbeats are our own schema, so unknown keys are refused (a typo or a version skew is an error
the router reports, not data silently dropped). Client request bodies are *not* structured here:
clients own that schema and unknown fields pass through to the backend untouched.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar

import cattrs
from cattrs.preconf.json import make_converter

from herd.core.models import MemoryPressure, NodeReport, NodeStatus

T = TypeVar("T")

converter = make_converter(forbid_extra_keys=True)


def _strict(kind: type[Any]) -> Any:
    """Refuse instead of coercing: ``"node_id": 5`` is an error, not the id ``"5"``."""

    def structure(value: Any, _: Any) -> Any:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is float and isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value}")
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
        return value

    return structure


for _kind in (str, int, float, bool):
    converter.register_structure_hook(_kind, _strict(_kind))
# Our StrEnums are str subclasses: give them their own hook, more specific than str's.
for _enum in (MemoryPressure, NodeStatus):
    converter.register_structure_hook(_enum, lambda value, kind: kind(value))


class WireError(ValueError):
    """A message from the wire did not match our schema; the message says where."""


def unstructure(value: Any) -> Any:
    return converter.unstructure(value)


def structure(data: Any, cls: type[T]) -> T:
    """Build ``cls`` from plain data. Raises :class:`WireError` naming the bad field."""
    try:
        return converter.structure(data, cls)
    except cattrs.BaseValidationError as exc:
        details = "; ".join(cattrs.transform_error(exc))
        raise WireError(f"invalid {cls.__name__}: {details}") from exc
    except (TypeError, ValueError, KeyError) as exc:
        raise WireError(f"invalid {cls.__name__}: {exc}") from exc


def report_to_json(report: NodeReport) -> str:
    return json.dumps({"type": "heartbeat", "node": unstructure(report)})


def report_from_data(data: Any) -> NodeReport:
    return structure(data, NodeReport)
