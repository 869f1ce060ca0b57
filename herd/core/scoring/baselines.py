"""The placements herd is measured against: round-robin, least-connections and random.

Each is a plain load balancer made model-aware, as a fair rival must be: it picks only among
nodes that could serve the request at all (:func:`herd.core.scoring.engine.eliminate`: online, has
the model, can hold it), and knows nothing else: not what is loaded, not speeds, not history.
Pure, like the scorer: the caller passes the fleet and a seeded ``random.Random``.
"""

from __future__ import annotations

import random

import attrs

from herd.core.models import FleetSnapshot, NodeSnapshot
from herd.core.scoring.engine import RouteRequest, eliminate


def eligible(request: RouteRequest, fleet: FleetSnapshot) -> list[NodeSnapshot]:
    """Nodes that could serve ``request`` at all, in fleet order."""
    return [n for n in fleet.nodes if eliminate(request, n) is None]


@attrs.define(eq=False)
class RoundRobin:
    """Each model's requests go to its eligible nodes in turn."""

    _turn: dict[str, int] = attrs.field(factory=dict)

    def pick(self, request: RouteRequest, fleet: FleetSnapshot, rng: random.Random) -> str | None:
        nodes = eligible(request, fleet)
        if not nodes:
            return None
        turn = self._turn.get(request.model, 0)
        self._turn[request.model] = turn + 1
        return nodes[turn % len(nodes)].node_id


def least_connections(
    request: RouteRequest, fleet: FleetSnapshot, rng: random.Random
) -> str | None:
    """The eligible node with the fewest requests running or waiting; ties at random."""
    nodes = eligible(request, fleet)
    if not nodes:
        return None
    fewest = min(n.in_flight + n.pending for n in nodes)
    return rng.choice([n for n in nodes if n.in_flight + n.pending == fewest]).node_id


def uniform(request: RouteRequest, fleet: FleetSnapshot, rng: random.Random) -> str | None:
    """Any eligible node, uniformly at random."""
    nodes = eligible(request, fleet)
    return rng.choice(nodes).node_id if nodes else None
