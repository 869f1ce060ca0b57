"""Which addresses a node may send the router to. Pure: no I/O (names are resolved by the
caller and passed in).

A node tells the router where its backend is (``backend.url``) and where its own app is
(``agent_url``); the router then sends clients' prompts there. So a node may only name itself:

- ``http`` or ``https``; no user or password, no query, no fragment;
- no path, except the node's own LAN proxy prefix (``/backend``) on a backend the node marks
  ``proxied``;
- the host is the address the node's socket comes from (a name must resolve to it), unless
  the operator allows more hosts (``--allow-backend-host``: names, addresses or CIDR ranges,
  or ``*`` for any): a node whose backend runs on another machine.

Anything else is refused with the reason, and the node's heartbeat is not taken.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping

from herd.core.models import NodeReport

PROXY_PATH = "/backend"


def is_loopback_host(host: str) -> bool:
    """Is ``host`` this machine only: any of 127.0.0.0/8, ``::1`` (bracketed or not),
    ``localhost`` and the names under it (RFC 6761)? An empty host is not: listening on it
    means every interface."""
    host = host.strip().lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name: it may resolve to any interface


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    for entry in allowed:
        entry = entry.strip().lower()
        if entry == "*" or entry == host:
            return True
        try:
            if ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def hosts_to_resolve(report: NodeReport) -> set[str]:
    """The names (not addresses) in a report's URLs, which the caller resolves."""
    names = set()
    for url in (report.backend.url, report.agent_url):
        host = urllib.parse.urlsplit(url).hostname if url else None
        if host and not is_address(host):
            names.add(host.lower())
    return names


def _same_machine(host: str, peer: str, resolved: Mapping[str, frozenset[str]]) -> bool:
    addresses = {host} if is_address(host) else set(resolved.get(host, ()))
    try:
        peer_ip = ipaddress.ip_address(peer)
    except ValueError:
        return False
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if ip == peer_ip or (ip.is_loopback and peer_ip.is_loopback):
            return True
    return False


def check_url(
    what: str,
    url: str,
    *,
    may_proxy: bool,
    peer: str,
    resolved: Mapping[str, frozenset[str]],
    allowed: tuple[str, ...],
) -> str | None:
    """None if ``url`` is fine for a node at ``peer``; else why not."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"its {what} URL {url!r} is not a URL ({exc})"
    del port  # parsed for its check only
    if parts.scheme not in ("http", "https"):
        return f"its {what} URL {url!r} must be http or https"
    if parts.username or parts.password:
        return f"its {what} URL may not carry a user or password"
    if parts.query or parts.fragment:
        return f"its {what} URL {url!r} may not carry a query or fragment"
    path = parts.path.rstrip("/")
    if path and not (may_proxy and path == PROXY_PATH):
        return f"its {what} URL {url!r} may not carry a path"
    host = (parts.hostname or "").lower()
    if not host:
        return f"its {what} URL {url!r} has no host"
    if _same_machine(host, peer, resolved) or _host_allowed(host, allowed):
        return None
    return (
        f"its {what} URL names {host}, which is not the address it connects from ({peer}); "
        f"an operator can allow it with --allow-backend-host {host}"
    )


def check_report(
    report: NodeReport,
    peer: str,
    resolved: Mapping[str, frozenset[str]],
    allowed: tuple[str, ...],
) -> str | None:
    """None if the report's URLs are fine for a node at ``peer``; else why not."""
    if report.backend.url:
        problem = check_url(
            "backend",
            report.backend.url,
            may_proxy=report.backend.proxied,
            peer=peer,
            resolved=resolved,
            allowed=allowed,
        )
        if problem:
            return problem
    if report.agent_url:
        return check_url(
            "agent",
            report.agent_url,
            may_proxy=False,
            peer=peer,
            resolved=resolved,
            allowed=allowed,
        )
    return None
