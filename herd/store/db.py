"""The trace store: schema, connections, retention, in one of two databases.

- **SQLite** (the default): ``latency.db`` in the data dir, in WAL mode. Readers open their own
  short-lived connection (WAL lets them read while the writer writes).
- **PostgreSQL** (``--store postgresql://user@host:port/db``): one database that several routers
  share, so each router's dashboard shows the whole fleet's history.

One code path, two dialects. Every statement is written once, with ``?`` (positional) or
``:name`` placeholders, in SQL both databases speak (``COUNT(*) FILTER (WHERE ...)``,
``INSERT ... ON CONFLICT DO UPDATE``, ``RETURNING``); the few places where they differ (a
float's type, an id column, the day of an epoch, a bucket number, a JSON array's items, index
hints, the covering index, how to list a table's columns) come from the :class:`Dialect`.
:class:`Store` wraps the driver's connection: it translates the placeholders for psycopg (which
takes ``%s`` and ``%(name)s``), returns rows as dicts or tuples, and maps every driver error to
:class:`StoreError` in one place.

Synchronous on purpose: every function here runs in a worker thread (``trio.to_thread``), never
on the event loop. psycopg 3 is used through its synchronous API for that reason (it has no Trio
support), and only when a PostgreSQL URL is given: it is the optional extra ``postgres``.

Errors: :class:`StoreError` (a statement or a connection failed; the message names the store)
and its subclass :class:`StorageError` (the store can't be used at all: raised at start-up).
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import attrs

from herd.core.store_url import check_store_url, redact_url
from herd.core.timeline import FleetEvent
from herd.core.traces import TraceRecord

DB_NAME = "latency.db"
# Seconds a PostgreSQL connection attempt, statement, or unacknowledged send may take.
CONNECT_TIMEOUT = 5
STATEMENT_TIMEOUT = 30


class StoreError(Exception):
    """A statement or a connection to the store failed; the message says which store and why
    (``reason``: why alone)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}" if where else reason)
        self.reason = reason


class StorageError(StoreError):
    """The data directory or the store can't be used; the message says what and where."""

    def __init__(self, message: str) -> None:
        super().__init__("", message)


@attrs.frozen
class Dialect:
    """Where SQLite's SQL and PostgreSQL's differ. Templates take ``{}`` / ``{0}``, ``{1}``."""

    name: str
    float_type: str  # column type of a float (SQLite's REAL is PostgreSQL's 4-byte float)
    id_column: str  # an id the database assigns, in insertion order
    day: str  # {0}: epoch seconds -> 'YYYY-MM-DD' (UTC)
    bucket: str  # {0}: epoch seconds, {1}: bucket seconds -> the bucket's number (floor)
    json_items: str  # {0}: a JSON array column, {1}: alias -> a FROM item with column "value"
    unindexed: str  # {0}: a column whose index the planner should not pick for this term
    indexed_by: str  # {0}: an index the planner must use (SQLite's hint; nothing elsewhere)
    window_index: str  # the index the windowed queries search (see queries.py)
    columns_query: str  # one ? (a table) -> its column names
    init_lock: str | None  # taken (in the transaction) while the schema is made or migrated
    positional: str  # the driver's positional placeholder

    def sql(self, text: str) -> str:
        """``text`` with the driver's placeholders (written with ``?`` and ``:name``)."""
        return _translate(text, self.positional)


@lru_cache(maxsize=256)
def _translate(text: str, positional: str) -> str:
    if positional == "?":
        return text
    text = text.replace("%", "%%")
    text = re.sub(r"(?<![:\w]):([A-Za-z_]\w*)", r"%(\1)s", text)
    return text.replace("?", positional)


# The dashboard's windowed queries read only these columns, so SQLite answers them from the
# index alone (a "covering index": no lookup into the table per row). Time first: every
# dashboard query is a time range. It replaces the plain timestamp index of earlier versions.
_SQLITE_WINDOW_INDEX = """
CREATE INDEX IF NOT EXISTS request_traces_window ON request_traces (
    timestamp, status, node_id, model, latency_ms, time_to_first_token_ms, prompt_tokens,
    completion_tokens, retry_count, fallback_used, substitution, tags
);
DROP INDEX IF EXISTS request_traces_timestamp;
"""
# PostgreSQL's B-tree entries have a size limit (about 2.7 kB) that a covering index holding
# the tags could pass: the time alone, and the table for the rest.
_POSTGRES_WINDOW_INDEX = """
CREATE INDEX IF NOT EXISTS request_traces_time ON request_traces (timestamp);
"""

SQLITE = Dialect(
    name="sqlite",
    float_type="REAL",
    id_column="INTEGER PRIMARY KEY AUTOINCREMENT",
    day="date({0}, 'unixepoch')",
    bucket="CAST({0} / {1} AS INTEGER)",
    json_items="json_each({0}) AS {1}",
    unindexed="+{0}",
    indexed_by="INDEXED BY {0}",
    window_index=_SQLITE_WINDOW_INDEX,
    columns_query="SELECT name FROM pragma_table_info(?)",
    init_lock=None,  # SQLite's write lock serialises the whole script
    positional="?",
)
POSTGRES = Dialect(
    name="postgresql",
    float_type="DOUBLE PRECISION",
    id_column="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    day="to_char(to_timestamp({0}) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    bucket="CAST(FLOOR({0} / {1}) AS BIGINT)",
    json_items="json_array_elements_text(CAST({0} AS json)) AS {1}(value)",
    unindexed="{0}",
    indexed_by="",
    window_index=_POSTGRES_WINDOW_INDEX,
    columns_query=(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = ?"
    ),
    # Two routers starting together would race on CREATE TABLE IF NOT EXISTS.
    init_lock="SELECT pg_advisory_xact_lock(7268657264)",  # "herd" in a number
    positional="%s",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS request_traces (
    request_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    original_model TEXT NOT NULL,
    node_id TEXT,
    score {float},
    scores_breakdown TEXT NOT NULL DEFAULT '{{}}',
    status TEXT NOT NULL,
    latency_ms {float} NOT NULL,
    time_to_first_token_ms {float},
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    retry_count INTEGER NOT NULL DEFAULT 0,
    fallback_used INTEGER NOT NULL DEFAULT 0,
    excluded_nodes TEXT NOT NULL DEFAULT '[]',
    original_format TEXT NOT NULL,
    kind TEXT NOT NULL,
    error_message TEXT,
    timestamp {float} NOT NULL,
    tags TEXT NOT NULL DEFAULT '[]',
    substitution TEXT,
    context_action TEXT,
    offload {float},
    runners_up TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS request_traces_node_model ON request_traces (node_id, model, timestamp);
CREATE TABLE IF NOT EXISTS benchmark_runs (
    id {id},
    timestamp {float} NOT NULL,
    name TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fleet_events (
    id {id},
    timestamp {float} NOT NULL,
    kind TEXT NOT NULL,
    node_id TEXT,
    model TEXT,
    detail TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS fleet_events_timestamp ON fleet_events (timestamp);
CREATE TABLE IF NOT EXISTS router_settings (
    name TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    timestamp {float} NOT NULL
);
"""
# Columns added since the first schema, with their definitions (added to older databases).
ADDED_COLUMNS = {
    "substitution": "TEXT",
    "context_action": "TEXT",
    "runners_up": "TEXT NOT NULL DEFAULT '[]'",
    "offload": "{float}",
}
# Events kept at most (the oldest go first), whatever their age.
MAX_EVENTS = 100_000


def schema(dialect: Dialect) -> str:
    """The tables and indexes in ``dialect``'s words (without the window index)."""
    return SCHEMA.format(float=dialect.float_type, id=dialect.id_column)


COLUMNS = (
    "request_id",
    "model",
    "original_model",
    "node_id",
    "score",
    "scores_breakdown",
    "status",
    "latency_ms",
    "time_to_first_token_ms",
    "prompt_tokens",
    "completion_tokens",
    "retry_count",
    "fallback_used",
    "excluded_nodes",
    "original_format",
    "kind",
    "error_message",
    "timestamp",
    "tags",
    "substitution",
    "context_action",
    "offload",
    "runners_up",
)
# A trace written again (the same request id) replaces the row.
INSERT = (
    f"INSERT INTO request_traces ({', '.join(COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in COLUMNS)}) "
    "ON CONFLICT (request_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])
)


# ---------------------------------------------------------------------------- targets


@attrs.frozen
class StoreTarget:
    """Where the store is: a SQLite file (``path``) or a PostgreSQL URL (``url``)."""

    path: Path | None = None
    url: str | None = None

    @classmethod
    def sqlite(cls, path: Path) -> StoreTarget:
        return cls(path=path)

    @classmethod
    def postgres(cls, url: str) -> StoreTarget:
        """Raises ValueError unless ``url`` is a ``postgresql://`` URL."""
        return cls(url=check_store_url(url))

    @classmethod
    def parse(cls, text: str | None, data_dir: Path) -> StoreTarget:
        """``--store``'s value: a ``postgresql://`` URL, or empty/None for ``latency.db`` in
        ``data_dir``. Raises ValueError saying what the value should look like."""
        if not text or not text.strip():
            return cls.sqlite(data_dir / DB_NAME)
        return cls.postgres(text)

    @property
    def dialect(self) -> Dialect:
        return SQLITE if self.url is None else POSTGRES

    def describe(self) -> str:
        """The path, or the URL without its password (for logs and errors)."""
        if self.url is None:
            return str(self.path)
        return redact_url(self.url)

    def connect(self) -> Store:
        """A new connection. Raises :class:`StoreError` (:class:`StorageError` when the
        PostgreSQL driver is missing)."""
        if self.url is None:
            assert self.path is not None
            try:
                return Store(_sqlite_connect(self.path), SQLITE, self)
            except sqlite3.Error as exc:
                raise StoreError(str(self.path), f"cannot open it: {exc}") from exc
        return Store(_postgres_connect(self), POSTGRES, self)


def _sqlite_connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=10, check_same_thread=False)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    return connection


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise StorageError(
            "--store postgresql://... needs the PostgreSQL driver psycopg 3: install herd "
            "with its postgres extra (pip install '.[postgres]' in the checkout)"
        ) from exc
    return psycopg


def _postgres_connect(target: StoreTarget) -> Any:
    psycopg = _psycopg()
    assert target.url is not None
    try:
        given = psycopg.conninfo.conninfo_to_dict(target.url)
    except psycopg.Error as exc:
        raise StorageError(
            f"cannot read the store URL {target.describe()}: {_reason(exc)}"
        ) from exc
    # Every wait bounded (the URL may say otherwise): connecting, each statement, and a send
    # the server never acknowledges (a peer gone without a word).
    params: dict[str, Any] = {
        key: value
        for key, value in (
            ("connect_timeout", str(CONNECT_TIMEOUT)),
            ("tcp_user_timeout", str(STATEMENT_TIMEOUT * 1000)),
            ("application_name", "herd"),
        )
        if key not in given
    }
    options = str(given.get("options", ""))
    if "statement_timeout" not in options:
        params["options"] = f"{options} -c statement_timeout={STATEMENT_TIMEOUT * 1000}".strip()
    try:
        return psycopg.connect(target.url, autocommit=True, **params)
    except psycopg.Error as exc:
        raise StoreError(target.describe(), f"cannot connect: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---------------------------------------------------------------------------- connections


@attrs.define(eq=False)
class Store:
    """One connection to the store, used from one thread at a time. Every method raises
    :class:`StoreError` for any failure of the database or its driver."""

    raw: Any  # sqlite3.Connection | psycopg.Connection
    dialect: Dialect
    target: StoreTarget

    @contextlib.contextmanager
    def _mapped(self) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except sqlite3.Error as exc:
            raise StoreError(self.target.describe(), str(exc)) from exc
        except Exception as exc:
            if self.dialect is POSTGRES and isinstance(exc, _psycopg().Error):
                raise StoreError(self.target.describe(), _reason(exc)) from exc
            raise

    @property
    def broken(self) -> bool:
        """The connection is gone (the server went away): open a new one."""
        return self.dialect is POSTGRES and bool(self.raw.closed or self.raw.broken)

    def _cursor(self, dicts: bool) -> Any:
        if self.dialect is SQLITE:
            cursor = self.raw.cursor()
            if not dicts:
                cursor.row_factory = None
            return contextlib.closing(cursor)
        from psycopg.rows import dict_row, tuple_row

        return self.raw.cursor(row_factory=dict_row if dicts else tuple_row)

    def rows(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        with self._mapped(), self._cursor(True) as cursor:
            cursor.execute(self.dialect.sql(sql), args)
            return [dict(row) for row in cursor.fetchall()]

    def tuples(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        with self._mapped(), self._cursor(False) as cursor:
            cursor.execute(self.dialect.sql(sql), args)
            return [tuple(row) for row in cursor.fetchall()]

    def value(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> Any:
        """The first column of the first row (None without rows)."""
        found = self.tuples(sql, args)
        return found[0][0] if found else None

    def execute(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> int:
        """Run a statement; returns how many rows it changed."""
        with self._mapped(), self._cursor(False) as cursor:
            cursor.execute(self.dialect.sql(sql), args)
            return int(cursor.rowcount)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._mapped(), self._cursor(False) as cursor:
            cursor.executemany(self.dialect.sql(sql), list(rows))

    def script(self, text: str) -> None:
        """Statements without parameters, separated by ``;``."""
        for statement in text.split(";"):
            if statement.strip():
                self.execute(statement)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside commits together, or not at all."""
        with self._mapped():
            if self.dialect is SQLITE:
                with self.raw:
                    yield
            else:
                with self.raw.transaction():
                    yield

    def columns(self, table: str) -> set[str]:
        return {row[0] for row in self.tuples(self.dialect.columns_query, (table,))}

    def limit_bytes(self, max_bytes: int) -> None:
        """Let the database grow to at most ``max_bytes`` (SQLite's page count; PostgreSQL's
        size is its administrator's to limit: nothing is done there)."""
        if self.dialect is SQLITE:
            page = self.value("PRAGMA page_size")
            self.execute(f"PRAGMA max_page_count = {max(1, max_bytes // page)}")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()


def connect(target: StoreTarget | Path) -> Store:
    """A connection to ``target`` (a path means that SQLite file). Raises StoreError."""
    if isinstance(target, Path):
        target = StoreTarget.sqlite(target)
    return target.connect()


@contextlib.contextmanager
def connected(target: StoreTarget | Path) -> Iterator[Store]:
    store = connect(target)
    try:
        yield store
    finally:
        store.close()


# ---------------------------------------------------------------------------- schema


def check_data_dir(data_dir: Path, database: bool = True, store: StoreTarget | None = None) -> None:
    """Check that ``data_dir`` can be created and written (and, with ``database``, that the
    trace store, ``store`` or else ``latency.db`` there, opens and takes a write). Raises
    :class:`StorageError` naming the path or the store and the reason."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".herd-write-check"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StorageError(f"cannot write to the data directory {data_dir}: {reason}") from exc
    if not database:
        return
    target = store or StoreTarget.sqlite(data_dir / DB_NAME)
    initialise(target)
    try:
        with connected(target) as connection, connection.transaction():
            connection.execute("CREATE TABLE IF NOT EXISTS herd_write_check (x INTEGER)")
            connection.execute("DROP TABLE herd_write_check")
    except StoreError as exc:
        raise StorageError(f"cannot use the {_noun(target)}: {exc.reason}") from exc
    except OSError as exc:
        raise StorageError(f"cannot use the {_noun(target)}: {exc}") from exc


def _noun(target: StoreTarget) -> str:
    kind = "trace database" if target.url is None else "trace store"
    return f"{kind} {target.describe()}"


def initialise(target: StoreTarget | Path) -> None:
    """Create the tables and indexes, and bring an older database up to this schema (columns
    added, the window index built: a minute or so for millions of rows, once). Raises
    :class:`StorageError` naming the store when it can't be reached or used."""
    if isinstance(target, Path):
        target = StoreTarget.sqlite(target)
    try:
        if target.path is not None:
            target.path.parent.mkdir(parents=True, exist_ok=True)
        with connected(target) as connection:
            dialect = connection.dialect
            with connection.transaction():
                if dialect.init_lock:
                    connection.execute(dialect.init_lock)
                connection.script(schema(dialect))
                have = connection.columns("request_traces")
                for name, definition in ADDED_COLUMNS.items():
                    if name not in have:
                        kind = definition.format(float=dialect.float_type)
                        connection.execute(f"ALTER TABLE request_traces ADD COLUMN {name} {kind}")
                connection.script(dialect.window_index)
    except StorageError:
        raise
    except StoreError as exc:
        raise StorageError(f"cannot use the {_noun(target)}: {exc.reason}") from exc
    except OSError as exc:
        raise StorageError(f"cannot use the {_noun(target)}: {exc}") from exc


# ---------------------------------------------------------------------------- writes


def trace_row(trace: TraceRecord) -> tuple[Any, ...]:
    return (
        trace.request_id,
        trace.model,
        trace.original_model,
        trace.node_id,
        trace.score,
        json.dumps(dict(trace.scores_breakdown)),
        trace.status,
        trace.latency_ms,
        trace.time_to_first_token_ms,
        trace.prompt_tokens,
        trace.completion_tokens,
        trace.retry_count,
        int(trace.fallback_used),
        json.dumps(list(trace.excluded_nodes)),
        trace.original_format,
        trace.kind,
        trace.error_message,
        trace.timestamp,
        json.dumps(list(trace.tags)),
        trace.substitution,
        trace.context_action,
        trace.offload,
        json.dumps([[node, score] for node, score in trace.runners_up]),
    )


def write_traces(connection: Store, traces: Iterable[TraceRecord]) -> None:
    with connection.transaction():
        connection.executemany(INSERT, [trace_row(t) for t in traces])


def prune(connection: Store, before: float) -> int:
    """Delete traces older than ``before`` (epoch seconds). Returns how many went."""
    with connection.transaction():
        return connection.execute("DELETE FROM request_traces WHERE timestamp < ?", (before,))


def write_events(connection: Store, events: Iterable[FleetEvent]) -> None:
    """Append events, then drop the oldest beyond :data:`MAX_EVENTS` (by id: cheap)."""
    with connection.transaction():
        connection.executemany(
            "INSERT INTO fleet_events (timestamp, kind, node_id, model, detail) "
            "VALUES (?, ?, ?, ?, ?)",
            [(e.timestamp, e.kind, e.node_id, e.model, e.detail) for e in events],
        )
        last = connection.value("SELECT MAX(id) FROM fleet_events")
        if last is not None and last > MAX_EVENTS:
            connection.execute("DELETE FROM fleet_events WHERE id <= ?", (last - MAX_EVENTS,))


def prune_events(connection: Store, before: float) -> int:
    """Delete events older than ``before`` (epoch seconds). Returns how many went."""
    with connection.transaction():
        return connection.execute("DELETE FROM fleet_events WHERE timestamp < ?", (before,))


SETTINGS_ROW = "runtime"  # the routers' runtime settings (herd.state.settings), one row


def read_settings(connection: Store) -> Any:
    """The runtime settings saved in the store (decoded JSON, not yet checked), or None when
    none were saved. Raises StoreError."""
    text = connection.value("SELECT data FROM router_settings WHERE name = ?", (SETTINGS_ROW,))
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise StoreError(connection.target.describe(), f"saved settings unreadable: {exc}") from exc


def write_settings(connection: Store, data: dict[str, Any], now: float) -> None:
    """Save the runtime settings (replacing what was saved). Raises StoreError."""
    connection.execute(
        "INSERT INTO router_settings (name, data, timestamp) VALUES (?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET data = excluded.data, timestamp = excluded.timestamp",
        (SETTINGS_ROW, json.dumps(data), now),
    )


def recent_latencies(
    target: StoreTarget | Path, per_key: int = 100
) -> list[tuple[str, str, float, float | None]]:
    """The last ``per_key`` completed requests per node:model: (node, model, latency_ms,
    tokens per second) — to warm the scorer's history after a restart."""
    query = """
        SELECT node_id, model, latency_ms, completion_tokens, time_to_first_token_ms FROM (
            SELECT *, ROW_NUMBER() OVER (
                PARTITION BY node_id, model ORDER BY timestamp DESC, request_id DESC
            ) AS n
            FROM request_traces WHERE status = 'completed' AND node_id IS NOT NULL
        ) AS latest WHERE n <= ? ORDER BY timestamp, request_id
    """
    with connected(target) as connection:
        rows = connection.rows(query, (per_key,))
    out = []
    for row in rows:
        rate = None
        generating = (row["latency_ms"] or 0) - (row["time_to_first_token_ms"] or 0)
        if row["completion_tokens"] and generating > 0:
            rate = row["completion_tokens"] / (generating / 1000)
        out.append((row["node_id"], row["model"], row["latency_ms"], rate))
    return out
