"""Scoring: a pure module that ranks the fleet for one request.

See :mod:`herd.core.scoring.engine`.
"""

from herd.core.scoring.engine import (
    SIGNALS,
    Candidate,
    Elimination,
    History,
    RouteDecision,
    RouteRequest,
    ScoringSettings,
    explain,
    score,
)

__all__ = [
    "SIGNALS",
    "Candidate",
    "Elimination",
    "History",
    "RouteDecision",
    "RouteRequest",
    "ScoringSettings",
    "explain",
    "score",
]
