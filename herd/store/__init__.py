"""The store: SQLite records of every routed request, written off the request path."""
