"""What a user's data costs on disk, as ``userMaxDiskMB`` counts it, and what chroma's
``chroma.sqlite3`` says about it (collections, segments).  Every function here blocks: run it in
a thread.  `DiskUsage` keeps the last measurement of each user and measures again off the event
loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import quote

import structlog

log = structlog.get_logger("stcs.quotas")


def collection_count(user_dir: Path) -> int | None:
    """Collections in every tenant and database of the chroma in ``user_dir`` (its
    ``chroma.sqlite3``, read-only; blocking: run it in a thread).  None when it cannot be read."""
    db_file = user_dir / "chroma.sqlite3"
    if not db_file.is_file():
        return 0
    try:
        con = sqlite3.connect(f"file:{quote(str(db_file))}?mode=ro", uri=True, timeout=1)
    except sqlite3.Error:
        return None
    try:
        return int(con.execute("SELECT COUNT(*) FROM collections").fetchone()[0])
    except sqlite3.Error:
        return None
    finally:
        con.close()


def collection_exists(user_dir: Path, tenant: str, database: str, name: str) -> bool:
    """Whether ``tenant``/``database`` of the chroma in ``user_dir`` has a collection called
    ``name`` (blocking).  False when it cannot be read."""
    try:
        con = sqlite3.connect(
            f"file:{quote(str(user_dir / 'chroma.sqlite3'))}?mode=ro", uri=True, timeout=1
        )
    except sqlite3.Error:
        return False
    try:
        row = con.execute(
            "SELECT 1 FROM collections c JOIN databases d ON c.database_id = d.id "
            "WHERE d.tenant_id = ? AND d.name = ? AND c.name = ?",
            (tenant, database, name),
        ).fetchone()
    except sqlite3.Error:
        return False
    finally:
        con.close()
    return row is not None


def _sqlite_live(db_file: str) -> tuple[int, set[str]] | None:
    """Bytes of ``db_file`` in use (pages minus free pages; SQLite frees pages on delete but
    does not shrink the file) and the ids of chroma's segments (``segments`` table; their
    directories hold the vector indexes).  None when it cannot be read (missing, locked, not
    chroma's schema)."""
    if not os.path.isfile(db_file):
        return None
    try:
        con = sqlite3.connect(f"file:{quote(db_file)}?mode=ro", uri=True, timeout=0.2)
    except sqlite3.Error:
        return None
    try:
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        free = con.execute("PRAGMA freelist_count").fetchone()[0]
        segments = {str(row[0]) for row in con.execute("SELECT id FROM segments")}
    except sqlite3.Error:
        return None
    finally:
        con.close()
    return max(0, pages - free) * page_size, segments


def _tree_size(path: str) -> int:
    total = 0
    with contextlib.suppress(OSError), os.scandir(path) as it:
        for entry in it:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    total += _tree_size(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
    return total


def data_size(user_dir: Path) -> int:
    """Bytes a user's chroma data takes, as the quota counts it (blocking: run it in a thread).

    Apparent file sizes, except where chroma keeps space it no longer uses: ``chroma.sqlite3``
    counts its pages in use (not its free pages), and a segment directory counts only while
    chroma's ``segments`` table still lists it (chroma 1.x leaves a deleted collection's index
    directory on disk).  So deleting records or collections brings a user back under the quota.
    0 for a directory that does not exist.
    """
    live = _sqlite_live(str(user_dir / "chroma.sqlite3"))
    total = 0
    try:
        it = os.scandir(user_dir)
    except OSError:
        return 0
    with it:
        for entry in it:
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    if live is None or entry.name in live[1]:
                        total += _tree_size(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    if live is not None and entry.name == "chroma.sqlite3":
                        total += live[0]
                    else:
                        total += entry.stat(follow_symlinks=False).st_size
    return total


def user_dirs(db_dir: Path) -> list[str]:
    """User ids that have a data directory under ``db_dir`` (not stcs's own ``.stcs``)."""
    try:
        with os.scandir(db_dir) as it:
            return [
                e.name for e in it if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
            ]
    except OSError:
        return []


def measure_all(db_dir: Path) -> dict[str, int]:
    """`data_size` of every user directory under ``db_dir`` (blocking)."""
    return {user_id: data_size(db_dir / user_id) for user_id in user_dirs(db_dir)}


class DiskUsage:
    """The last measured size of each user's data (bytes, `data_size`) under ``db_dir``.

    Measurements run in a thread, at most one per user at a time (a request during one
    schedules exactly one more).  ``clock``: monotonic seconds (when a measurement began).
    """

    def __init__(self, db_dir: Path, clock: Callable[[], float]) -> None:
        self.db_dir = db_dir
        self.clock = clock
        self.sizes: dict[str, int] = {}  # user id -> bytes, the last measurement
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._measured_at: dict[str, float] = {}  # user id -> when its last refresh began

    def get(self, user_id: str) -> int | None:
        """``user_id``'s last measured size (bytes); None when not measured yet."""
        return self.sizes.get(user_id)

    def values(self) -> Iterable[int]:
        """Every user's last measured size (bytes), for the metrics."""
        return list(self.sizes.values())

    def refresh(self, user_id: str) -> None:
        """Measure ``user_id``'s data again, in a thread; at most one measurement per user at a
        time (a request during one schedules exactly one more)."""
        if user_id in self._refreshing:
            self._dirty.add(user_id)
            return
        self._refreshing[user_id] = asyncio.get_running_loop().create_task(self._refresh(user_id))

    async def _refresh(self, user_id: str) -> None:
        try:
            while True:
                self._dirty.discard(user_id)
                self._measured_at[user_id] = self.clock()
                self.sizes[user_id] = await asyncio.to_thread(data_size, self.db_dir / user_id)
                if user_id not in self._dirty:
                    return
        except Exception:
            log.exception("measuring a user's data failed", user_id=user_id)
        finally:
            self._refreshing.pop(user_id, None)

    async def fresh(self, user_id: str) -> int | None:
        """``user_id``'s size measured after their last write (waits for a measurement that is
        running or, if there is none yet, takes one).  None if it cannot be measured."""
        if user_id not in self.sizes and user_id not in self._refreshing:
            self.refresh(user_id)
        while (task := self._refreshing.get(user_id)) is not None:
            await asyncio.shield(task)  # a cancelled request must not cancel the measurement
        return self.sizes.get(user_id)

    async def measure_all(self) -> None:
        """Measure every user's data (in a thread) and replace the cached sizes, except those
        of users measured again since this began (the write lock relies on fresh ones)."""
        began = self.clock()
        sizes = await asyncio.to_thread(measure_all, self.db_dir)
        for user_id, at in self._measured_at.items():
            if (at >= began or user_id in self._refreshing) and user_id in self.sizes:
                sizes[user_id] = self.sizes[user_id]
        self.sizes = sizes

    def prune(self) -> None:
        """Forget when users were measured over an hour ago (bounded memory)."""
        now = self.clock()
        self._measured_at = {u: at for u, at in self._measured_at.items() if at >= now - 3600}

    async def close(self) -> None:
        """Cancel the measurements running."""
        tasks = list(self._refreshing.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
