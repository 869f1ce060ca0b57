"""The node agent: heartbeats to the router over one WebSocket, beside one backend."""
