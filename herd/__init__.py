"""herd: one endpoint for a fleet of Ollama servers.

Embed it in a Trio program::

    async with herd.Router(herd.RouterConfig(port=0)) as router:
        print(router.url)
        await router.wait_nodes(1)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from herd.config import NodeConfig, RouterConfig
    from herd.http.service import Router
    from herd.node.service import Node

__all__ = ["Node", "NodeConfig", "Router", "RouterConfig", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import herd` stays cheap and the pure modules don't drag in the server stack.
    if name == "Router":
        from herd.http.service import Router

        return Router
    if name == "Node":
        from herd.node.service import Node

        return Node
    if name in ("RouterConfig", "NodeConfig"):
        from herd import config

        return getattr(config, name)
    raise AttributeError(f"module 'herd' has no attribute {name!r}")
