"""A node may only send the router to itself: its advertised URLs are checked (scheme, no
path/query/fragment/credentials, its own address unless allowed), and the router follows no
redirects. Real router, a raw WebSocket client as the rogue node, a backend that redirects."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from herd.core.models import BackendInfo, NodeReport
from herd.core.policy import node_urls
from herd.core.wire import report_to_json
from tests.conftest import running_fleet
from tests.test_node_io import RogueBackend, answer, rogue_node
from tests.test_security import fleet_socket


def report(url: str, proxied: bool = False, agent_url: str = "") -> NodeReport:
    return NodeReport(
        node_id="rogue",
        agent_url=agent_url,
        backend=BackendInfo(url=url, healthy=True, proxied=proxied),
    )


@pytest.mark.parametrize(
    ("url", "proxied", "agent", "problem"),
    [
        ("http://127.0.0.1:11434", False, "", None),
        ("http://localhost:11434", False, "", None),
        ("http://127.0.0.1:11436/backend", True, "http://127.0.0.1:11436", None),
        ("http://127.0.0.1:11434/admin?x=", False, "", "query"),
        ("http://127.0.0.1:11434/admin", False, "", "path"),
        ("http://127.0.0.1:11436/backend", False, "", "path"),  # only a proxy has that path
        ("ftp://127.0.0.1:21", False, "", "http or https"),
        ("http://user:pw@127.0.0.1:11434", False, "", "user or password"),
        ("http://10.9.9.9:11434", False, "", "not the address it connects from"),
        ("http://127.0.0.1:11434", False, "http://127.0.0.1:1/x#y", "query or fragment"),
    ],
)
def test_advertised_urls(url: str, proxied: bool, agent: str, problem: str | None) -> None:
    resolved = {"localhost": frozenset({"127.0.0.1"})}
    found = node_urls.check_report(report(url, proxied, agent), "127.0.0.1", resolved, ())
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found, found


def test_allowed_hosts() -> None:
    elsewhere = report("http://10.9.9.9:11434")
    assert node_urls.check_report(elsewhere, "127.0.0.1", {}, ("10.0.0.0/8",)) is None
    assert node_urls.check_report(elsewhere, "127.0.0.1", {}, ("*",)) is None
    assert node_urls.check_report(elsewhere, "127.0.0.1", {}, ("10.9.9.8",)) is not None


async def send_as_node(url: str, node: NodeReport) -> str:
    """Heartbeat as ``node``; the router's answer, or why it closed the socket."""
    with trio.fail_after(10):
        try:
            async with fleet_socket(url) as ws:
                await ws.send_message(report_to_json(node))
                return str(json.loads(await ws.get_message())["type"])
        except* ConnectionClosed as group:
            closed = group.exceptions[0]
            assert isinstance(closed, ConnectionClosed)
            reason = closed.reason
            found = f"closed {reason.code}: {reason.reason}" if reason else "closed"
        return found


async def test_a_node_naming_another_service_is_refused(tmp_path: Path) -> None:
    async with running_fleet(tmp_path, []) as fleet:
        internal = report("http://127.0.0.1:9/admin?x=")
        assert (await send_as_node(fleet.url, internal)).startswith("closed 1008: refused: its")
        other_host = report("http://10.9.9.9:11434")
        assert "not the address" in await send_as_node(fleet.url, other_host)
        assert fleet.router.fleet.nodes == ()  # neither joined
    async with running_fleet(tmp_path, [], allow_backend_hosts=("10.9.9.9",)) as fleet:
        assert await send_as_node(fleet.url, report("http://10.9.9.9:11434")) == "ack"


async def test_the_router_follows_no_redirects(tmp_path: Path) -> None:
    from herd.config import RouterConfig
    from herd.http.service import Router

    backend = RogueBackend()
    backend.answers[("POST", "/api/chat")] = lambda send: answer(
        send, 307, b"", (b"location", b"http://10.9.9.9/steal")
    )
    config = RouterConfig(host="127.0.0.1", port=0, data_dir=str(tmp_path), max_retries=0)
    async with (
        Router(config) as router,
        rogue_node(router, backend),
        httpx.AsyncClient(base_url=router.url, timeout=30, trust_env=False) as client,
    ):
        chat = await client.post(
            "/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code == 502
        assert "redirect (307 to http://10.9.9.9/steal); herd follows none" in chat.json()["error"]
