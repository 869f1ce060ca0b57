"""The router's state: the node registry, the queue book, latency history, conversation
affinity, runtime settings, metrics, and :class:`~herd.state.state.RouterState` that holds
them. Imports only :mod:`herd.core` (and the configuration)."""
