"""mDNS: the router advertises ``_herd._tcp.local.``; a node without ``--router-url`` finds it.

zeroconf's synchronous API runs in worker threads (its asyncio API is not ours): registering,
browsing and unregistering each happen in ``trio.to_thread``. The advertisement carries the
router's port and version; a node that loses its router looks again before each reconnect, so it
follows a router that moved to another machine or port.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

import psutil
import trio
from zeroconf import ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from herd import __version__

log = logging.getLogger("herd.discovery")

SERVICE_TYPE = "_herd._tcp.local."


def lan_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                found.append(address.address)
    return found


def advertised_addresses(host: str) -> list[str]:
    if host in ("0.0.0.0", "", "::"):
        return lan_addresses() or ["127.0.0.1"]
    return [host]


async def advertise(
    host: str, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Advertise the router until cancelled. The instance is named by the machine and the
    port, so several routers on one machine (behind one balancer) each advertise; a name
    another machine already holds gets a number added rather than failing."""
    addresses = advertised_addresses(host)
    name = socket.gethostname().split(".")[0] or "herd"
    info = ServiceInfo(
        SERVICE_TYPE,
        f"herd router on {name} port {port}.{SERVICE_TYPE}",
        addresses=[socket.inet_aton(a) for a in addresses],
        port=port,
        properties={"version": __version__, "path": "/"},
        server=f"{name}.local.",
    )
    interfaces: Any = addresses if host not in ("0.0.0.0", "", "::") else None
    zeroconf = await trio.to_thread.run_sync(
        lambda: Zeroconf(interfaces=interfaces) if interfaces else Zeroconf()
    )
    try:
        await trio.to_thread.run_sync(
            lambda: zeroconf.register_service(info, allow_name_change=True)
        )
        log.info("advertising %s on %s port %d (mDNS)", SERVICE_TYPE, ", ".join(addresses), port)
        task_status.started()
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(3):
            await trio.to_thread.run_sync(zeroconf.unregister_service, info)
        zeroconf.close()


def _browse(timeout: float, interfaces: list[str] | None, settle: float = 0.0) -> list[str]:
    """Routers found within ``timeout``: the first, and those found within ``settle`` seconds
    after it."""
    found: list[str] = []
    done = threading.Event()
    zeroconf = Zeroconf(interfaces=interfaces) if interfaces else Zeroconf()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is not ServiceStateChange.Added:
            return
        info = zeroconf.get_service_info(service_type, name, timeout=3000)
        if info is None or not info.parsed_addresses():
            return
        url = f"http://{info.parsed_addresses()[0]}:{info.port}"
        if url not in found:
            found.append(url)
        done.set()

    try:
        ServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[on_change])
        if done.wait(timeout) and settle > 0:
            time.sleep(settle)  # (a worker thread: the others answer meanwhile)
    finally:
        zeroconf.close()
    return list(found)


async def discover(within: float = 5.0, interfaces: list[str] | None = None) -> str | None:
    """The URL of a router advertising itself, or None after ``within`` seconds."""
    found = await trio.to_thread.run_sync(_browse, within, interfaces, abandon_on_cancel=True)
    return found[0] if found else None


SETTLE = 1.0  # seconds to keep listening for more routers after the first answers


async def discover_all(within: float = 5.0, interfaces: list[str] | None = None) -> list[str]:
    """Every router advertising itself: those answering within :data:`SETTLE` seconds of the
    first (empty after ``within`` seconds with none)."""
    return await trio.to_thread.run_sync(
        _browse, within, interfaces, SETTLE, abandon_on_cancel=True
    )
