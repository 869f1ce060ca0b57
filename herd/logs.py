"""Logging: readable lines on the console, JSON lines in ``<data-dir>/logs/``.

One file per role (``herd.jsonl`` for the router, ``herd-node.jsonl`` for a node), rotated at
midnight UTC, 30 days kept. The file gets DEBUG, the console ``--log-level``. Nothing herd logs
contains a secret (tokens, API keys) or prompt text; requests are logged by id, model and node.

A record may carry structured fields (``logger.info(..., extra=fields(node="a", ms=12))``): the
JSONL file writes them as keys of the line beside ``ts``, ``level``, ``logger`` and ``message``;
the console shows only the message. The router's access lines (logger :data:`ACCESS_LOGGER`,
one per finished inference request) are such records; ``--quiet`` keeps them off the console.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import sys
import time
from pathlib import Path
from typing import Any

KEEP_DAYS = 30
FILES = {"router": "herd.jsonl", "node": "herd-node.jsonl"}
ACCESS_LOGGER = "herd.access"


def fields(**values: Any) -> dict[str, dict[str, Any]]:
    """The ``extra=`` of a logging call whose record carries structured fields (the record's
    ``extra`` attribute), for the JSONL file."""
    return {"extra": values}


# One encoder for every line (json.dumps with options builds a new one per call).
_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "extra", None)
        if isinstance(extra, dict):
            for key, value in extra.items():
                entry.setdefault(str(key), value)  # the four keys above are never replaced
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


class LogFile(logging.handlers.TimedRotatingFileHandler):
    """The JSONL file. When it can't be written (disk full, read-only), say so on stderr once
    per :data:`REPORT_EVERY` seconds instead of a traceback per record ("Logging error")."""

    REPORT_EVERY = 60.0
    _reported_at = -1e18
    _failures = 0

    def handleError(self, record: logging.LogRecord) -> None:
        self._failures += 1
        now = time.monotonic()
        if now - self._reported_at < self.REPORT_EVERY:
            return
        error = sys.exc_info()[1]
        print(
            f"herd: cannot write the log file {self.baseFilename} ({error}); "
            f"{self._failures} records lost so far. The console log goes on.",
            file=sys.stderr,
        )
        self._reported_at = now

    def flush(self) -> None:
        try:
            super().flush()
        except OSError:
            self.handleError(logging.makeLogRecord({}))

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # what is still buffered is lost, as the records before it were
            self.stream = None


def _file_handler(path: Path) -> logging.Handler:
    handler = LogFile(path, when="midnight", backupCount=KEEP_DAYS, encoding="utf-8", utc=True)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(JsonLines())
    return handler


def _not_access(record: logging.LogRecord) -> bool:
    return record.name != ACCESS_LOGGER


def _is_node(record: logging.LogRecord) -> bool:
    return record.name == NODE_LOGGER or record.name.startswith(NODE_LOGGER + ".")


NODE_LOGGER = "herd.node"


def setup_logging(
    console_level: str,
    data_dir: Path | None = None,
    role: str = "router",
    local_node: bool = False,
    quiet: bool = False,
) -> Path:
    """Configure the root logger; returns the JSONL file's path (or data_dir-less: none).
    A router with ``local_node`` writes its in-process node's records (logger ``herd.node``)
    to the node's file, as a separate ``herd-node`` process would. ``quiet``: no access lines
    on the console (the file keeps them)."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler()
    console.setLevel(getattr(logging, console_level.upper(), logging.INFO))
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    if quiet:
        console.addFilter(_not_access)
    root.addHandler(console)
    for noisy in ("httpx", "httpcore", "hypercorn", "trio-websocket", "quart"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    path = Path()
    if data_dir is not None:
        logs = data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / FILES.get(role, f"herd-{role}.jsonl")
        file_handler = _file_handler(path)
        root.addHandler(file_handler)
        if local_node and role == "router":
            file_handler.addFilter(lambda record: not _is_node(record))
            node_handler = _file_handler(logs / FILES["node"])
            node_handler.addFilter(_is_node)
            root.addHandler(node_handler)
    return path
