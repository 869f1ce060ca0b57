"""JSON views of a fleet snapshot."""

from __future__ import annotations

from herd.core import views
from herd.core.models import (
    AvailableModel,
    FleetSnapshot,
    LoadedModel,
    ModelLoad,
    NodeReport,
    NodeSnapshot,
    NodeStatus,
    QueueStatistics,
)


def node(node_id: str, status: NodeStatus = NodeStatus.ONLINE, **report: object) -> NodeSnapshot:
    return NodeSnapshot(
        report=NodeReport(node_id=node_id, **report),  # type: ignore[arg-type]
        status=status,
        last_seen=10.0,
        load={"a:latest": ModelLoad(pending=1, in_flight=2)},
    )


FLEET = FleetSnapshot(
    nodes=(
        node(
            "n1",
            available_models=(AvailableModel("a:latest", 10), AvailableModel("b:latest", 20)),
            loaded_models=(LoadedModel("a:latest", 10, 10, 4096, expires_at=0.0),),
        ),
        node("n2", available_models=(AvailableModel("a:latest", 10),)),
        node("gone", NodeStatus.OFFLINE, available_models=(AvailableModel("c:latest", 1),)),
    )
)


def test_tags_union_lists_nodes_and_skips_offline() -> None:
    models = views.tags(FLEET)["models"]
    assert [(m["name"], m["nodes"]) for m in models] == [
        ("a:latest", ["n1", "n2"]),
        ("b:latest", ["n1"]),
    ]


def test_tags_and_v1_models_merge_every_nodes_capabilities() -> None:
    """A model's capabilities are what any node reports (an older Ollama reports none), the
    same on /api/tags and /v1/models, whichever node is listed first."""
    fleet = FleetSnapshot(
        nodes=(
            node("old", available_models=(AvailableModel("a:latest", 10),)),
            node(
                "new",
                available_models=(
                    AvailableModel("a:latest", 10, capabilities=("completion", "tools")),
                ),
            ),
            node(
                "vision",
                available_models=(
                    AvailableModel("a:latest", 10, capabilities=("vision", "completion")),
                ),
            ),
        )
    )
    assert views.tags(fleet)["models"][0]["capabilities"] == ["completion", "tools", "vision"]
    assert views.openai_models(fleet, created=1)["data"][0]["capabilities"] == [
        "completion",
        "tools",
        "vision",
    ]


def test_ps_names_the_node() -> None:
    assert [(m["name"], m["node"], m["context_length"]) for m in views.ps(FLEET)["models"]] == [
        ("a:latest", "n1", 4096)
    ]
    assert views.ps(FLEET)["models"][0]["expires_at"] == "1970-01-01T00:00:00Z"


def test_fleet_status_counts() -> None:
    stats = QueueStatistics(pending=1, in_flight=2, done=5, failed=0, queues={"n1:a:latest": {}})
    status = views.fleet_status(FLEET, stats, now=12.5)
    assert status["fleet"] == {
        "nodes_total": 3,
        "nodes_online": 2,
        "nodes_degraded": 0,
        "models_loaded": 1,
        "models_spilled": 0,
        "requests_active": 3,
        "requests_pending": 1,
        "requests_in_flight": 2,
    }
    first = status["nodes"][0]
    assert first["last_seen_seconds_ago"] == 2.5
    assert first["requests_in_flight"] == 2
    assert first["models_loaded"][0]["context_length"] == 4096
    assert status["queues"] == {"n1:a:latest": {}}


def test_openai_models() -> None:
    data = views.openai_models(FLEET, created=1)["data"]
    assert [m["id"] for m in data] == ["a:latest", "b:latest"]


def test_ps_lists_a_model_loaded_on_two_nodes_once() -> None:
    twice = FleetSnapshot(
        nodes=(
            node(
                "n1",
                available_models=(AvailableModel("a:latest", 10, parent_model="base:7b"),),
                loaded_models=(LoadedModel("a:latest", 10, 10, 4096, expires_at=100.0),),
            ),
            node(
                "n2",
                available_models=(AvailableModel("a:latest", 10),),
                loaded_models=(LoadedModel("a:latest", 12, 6, 8192, expires_at=None),),
            ),
        )
    )
    (entry,) = views.ps(twice)["models"]
    assert entry["expires_at"] == views.FOREVER  # the copy that stays longest (n2: forever)
    assert (entry["node"], entry["context_length"], entry["size_vram"]) == ("n2", 8192, 6)
    assert [(c["node"], c["expires_at"]) for c in entry["nodes"]] == [
        ("n1", "1970-01-01T00:01:40Z"),
        ("n2", views.FOREVER),
    ]
    assert entry["details"]["parent_model"] == "base:7b"
    assert views.tags(twice)["models"][0]["details"]["parent_model"] == "base:7b"
