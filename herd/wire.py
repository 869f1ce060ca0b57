"""The one cattrs converter: (de)serialisation of our attrs values at the edges.

Heartbeats are our own schema, so unknown keys are refused (a typo or a version skew is an error
the router reports, not data silently dropped). Client request bodies are *not* structured here:
clients own that schema and unknown fields pass through to the backend untouched.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import cattrs
from cattrs.preconf.json import make_converter

from herd.models import NodeReport

T = TypeVar("T")

converter = make_converter(forbid_extra_keys=True)


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
