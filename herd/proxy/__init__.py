"""The proxy: shaping client requests, dispatching them to nodes, relaying the answers."""
