"""The router's one way of talking to nodes: the HTTP client policy, who gets the fleet token,
bounded reads of what nodes send, and the mapping of transport failures to herd's error tree.

- :mod:`herd.transport.client`: the shared ``httpx.AsyncClient`` (timeouts, pool, no
  compression) and the headers each call carries (the fleet token goes to herd node agents only,
  never to an inference server).
- :mod:`herd.transport.errors`: :func:`map_node_errors`, the one place an ``httpx`` exception
  becomes a :class:`~herd.core.errors.NodeError`.
- :mod:`herd.transport.bodies`: reading a node's answer with a size limit, and a short error
  detail from a failed one.
"""
