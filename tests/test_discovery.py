"""mDNS: a node with no --router-url finds the router. Runs in a network namespace of its own
(unshare -n, loopback with multicast on), so no multicast leaves this test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from herd.discovery import advertised_addresses

SCRIPT = textwrap.dedent("""
    import sys, trio
    from herd import Node, NodeConfig, Router, RouterConfig
    from herd.sim import SimConfig, SimModel, run_sim

    async def main():
        config = RouterConfig(host="127.0.0.1", port=0, data_dir=sys.argv[1], mdns=True)
        with trio.fail_after(30):
            async with Router(config) as router, run_sim(SimConfig(
                    models=(SimModel("m:latest"),))) as sim, trio.open_nursery() as nursery:
                node = Node(NodeConfig(router_url=None, ollama_url=sim.url, node_id="found",
                                       host="127.0.0.1", port=0, data_dir=sys.argv[1]))
                await nursery.start(node.run)
                await router.wait_nodes(1)
                print("joined", node.config.router_url == router.url, flush=True)
                nursery.cancel_scope.cancel()

    trio.run(main)
""")


# Two routers behind one balancer (docs/scale-out.md): a node started with no --router-url
# finds both and heartbeats to each.
SCRIPT_TWO = textwrap.dedent("""
    import sys, trio
    from herd import Node, NodeConfig, Router, RouterConfig
    from herd.sim import SimConfig, SimModel, run_sim

    async def main():
        one = RouterConfig(host="127.0.0.1", port=0, data_dir=sys.argv[1] + "/a", mdns=True)
        two = RouterConfig(host="127.0.0.1", port=0, data_dir=sys.argv[1] + "/b", mdns=True)
        with trio.fail_after(30):
            async with Router(one) as first, Router(two) as second, run_sim(SimConfig(
                    models=(SimModel("m:latest"),))) as sim, trio.open_nursery() as nursery:
                node = Node(NodeConfig(router_url=None, ollama_url=sim.url, node_id="found",
                                       host="127.0.0.1", port=0, data_dir=sys.argv[1]))
                await nursery.start(node.run)
                await first.wait_nodes(1)
                await second.wait_nodes(1)
                found = sorted(node.config.router_urls)
                print("joined both", found == sorted([first.url, second.url]), flush=True)
                nursery.cancel_scope.cancel()

    trio.run(main)
""")


def in_private_network(tmp_path: Path, script_text: str) -> subprocess.CompletedProcess[str]:
    """Run ``script_text`` in a network namespace of its own: loopback up, multicast on."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.fail(
            "this test needs root with unshare and ip (util-linux, iproute2) to make a "
            "private network namespace; CI runs as root"
        )
    script = tmp_path / "discover.py"
    script.write_text(script_text)
    setup = (
        "ip link set lo up && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo && "
    )
    return subprocess.run(
        ["unshare", "--net", "sh", "-c", setup + f'"{sys.executable}" "{script}" "{tmp_path}"'],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )


def test_node_finds_the_router_by_mdns(tmp_path: Path) -> None:
    result = in_private_network(tmp_path, SCRIPT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "joined True" in result.stdout


def test_a_node_finds_every_router_by_mdns_and_joins_each(tmp_path: Path) -> None:
    result = in_private_network(tmp_path, SCRIPT_TWO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "joined both True" in result.stdout


def test_advertised_addresses() -> None:
    assert advertised_addresses("192.168.1.9") == ["192.168.1.9"]
    assert all(
        not a.startswith("127.") or a == "127.0.0.1" for a in advertised_addresses("0.0.0.0")
    )
