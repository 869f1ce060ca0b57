"""Where the router keeps its runtime settings between starts: ``<data-dir>/settings.json``, or,
with a PostgreSQL store, the store's ``router_settings`` row (one copy for every router on it,
so a router started later, or again, comes up with the settings the others run with).

``settings.json`` is still read while the store has none saved: an operator moving to
PostgreSQL keeps the settings the router ran with. A store that can't be read at start is a
warning and the file's settings; one that can't be written refuses the change (503), so what
the dashboard shows is what was saved.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import attrs
import trio

from herd.core.errors import Unavailable
from herd.state.settings import RuntimeSettings, from_saved, load_settings, save_settings
from herd.store import db
from herd.store.db import StorageError, StoreError, StoreTarget

log = logging.getLogger("herd.router")


def _read(target: StoreTarget) -> object:
    db.initialise(target)  # the router's first start on this store: the table comes first
    with db.connected(target) as connection:
        return db.read_settings(connection)


def _write(target: StoreTarget, settings: RuntimeSettings) -> None:
    with db.connected(target) as connection:
        db.write_settings(connection, attrs.asdict(settings), time.time())


async def load(data_dir: Path, target: StoreTarget, defaults: RuntimeSettings) -> RuntimeSettings:
    """``defaults`` with the saved settings applied (see the module docstring)."""
    from_file = load_settings(data_dir, defaults)
    if target.url is None:
        return from_file
    try:
        saved = await trio.to_thread.run_sync(_read, target)
    except (StoreError, StorageError) as exc:
        reason = exc.reason if isinstance(exc, StoreError) else str(exc)
        log.warning(
            "cannot read the settings saved in %s (%s): starting with %s",
            target.describe(),
            reason,
            data_dir / "settings.json",
        )
        return from_file
    if saved is None:
        return from_file
    return from_saved(saved, defaults, target.describe())


async def save(data_dir: Path, target: StoreTarget | None, settings: RuntimeSettings) -> None:
    """Keep ``settings`` for the next start. Raises :class:`~herd.core.errors.Unavailable`
    naming where and why when they can't be written."""
    try:
        if target is not None and target.url is not None:
            await trio.to_thread.run_sync(_write, target, settings)
        else:
            await trio.to_thread.run_sync(save_settings, data_dir, settings)
    except StoreError as exc:
        raise Unavailable(
            f"the settings could not be saved in {target.describe() if target else ''}: "
            f"{exc.reason}; nothing was changed"
        ) from exc
    except OSError as exc:
        raise Unavailable(
            f"the settings could not be saved in {data_dir}: {exc.strerror or exc}; "
            "nothing was changed"
        ) from exc
