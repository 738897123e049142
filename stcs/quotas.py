"""Per-user quotas and rate limits: one tenant cannot starve the others.

The limits (settings, 0 is off, each overridable per user):

* ``userMaxDiskMB`` — a user's data directory size.  Writes (collection create, add, upsert,
  update, fork) are refused with 422 ``QuotaError`` while the user is at or over it; reads and
  deletes keep working, so a user can always get back under.  The size is measured off the event
  loop (`data_size` in a thread) every ``userDiskCheckInterval`` ms and after each of the user's
  writes and deletes; the request path only reads the cached number, so a write may pass while
  a refresh is still running (the overshoot is about one request's data).
* ``userMaxCollections``, ``userMaxRecordsPerCollection`` — checked against chroma's own counts
  (``collections_count``, ``collections/{id}/count`` of the v2 API) when a collection is created
  or forked, or records are added or upserted.
* ``userRequestsPerSecond`` + ``userRequestBurst`` — a token bucket per user (not per
  connection); beyond it 429 ``RateLimitError`` with ``Retry-After``.
* ``userMaxConcurrentRequests`` — a user's requests in flight; more wait up to
  ``userConcurrencyTimeout`` ms in FIFO order, then 429 ``RateLimitError``.

The request path uses two hooks that take plain values (no aiohttp request objects), so any
front end — today's aiohttp handler, a protocol-level relay — calls them the same way::

    admission = await quotas.admit(user_id, method, path)   # before the instance lease
    try:
        ...lease the instance...
        await admission.check_write(port)                   # after the lease, before forwarding
        ...forward...
    finally:
        admission.done(status)                              # exactly once

Per-user overrides are kept in ``<dbPath>/.stcs/limits.json`` as ``{userId: {key: value}}``
with the settings' YAML keys, so they survive restarts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import structlog

from stcs.config import Settings
from stcs.errors import QuotaExceededError, UserRateLimitError
from stcs.layout import Layout
from stcs.metrics import Metrics

log = structlog.get_logger("stcs.quotas")

MB = 1024 * 1024

# YAML key -> `Limits` field (the same name as the `Settings` field holding the default).
LIMIT_KEYS: dict[str, str] = {
    "userMaxDiskMB": "user_max_disk_mb",
    "userMaxCollections": "user_max_collections",
    "userMaxRecordsPerCollection": "user_max_records_per_collection",
    "userRequestsPerSecond": "user_requests_per_second",
    "userRequestBurst": "user_request_burst",
    "userMaxConcurrentRequests": "user_max_concurrent_requests",
    "userMaxMemoryMB": "user_max_memory_mb",  # enforced by stcs.memory, not on the request path
}


# chroma 1.x v2 API routes (chromadb/api/fastapi.py: create_collection, _add, _upsert, _update,
# _fork, _delete, delete_collection, delete_database).  Group 1: tenant, 2: database, 3: the
# collection id (or name, for DELETE), 4: the action.
_COLLECTIONS_RE = re.compile(
    r"/api/v2/tenants/([^/]+)/databases/([^/]+)/collections(?:/([^/]+)(?:/([a-z_]+))?)?/?"
)
_DATABASE_RE = re.compile(r"/api/v2/tenants/[^/]+/databases/[^/]+/?")
WRITES = frozenset(("create", "add", "upsert", "update", "fork"))

_COUNT_TIMEOUT = aiohttp.ClientTimeout(total=5, connect=1)


def classify(method: str, path: str) -> tuple[str | None, re.Match[str] | None]:
    """Which chroma operation ``method path`` is, as far as quotas care.

    Returns ``(kind, match)``: kind is "create" | "add" | "upsert" | "update" | "fork" (writes,
    refused over ``userMaxDiskMB``), "delete" (frees space: the size is measured again after it)
    or None (anything else: reads, heartbeats, ...).  ``path`` may carry a query string.
    """
    if method == "GET" or method == "HEAD":
        return None, None
    path = path.partition("?")[0]
    m = _COLLECTIONS_RE.fullmatch(path)
    if m is None:
        if method == "DELETE" and _DATABASE_RE.fullmatch(path):
            return "delete", None
        return None, None
    collection, action = m.group(3), m.group(4)
    if method == "POST":
        if collection is None:
            return "create", m
        if action in ("add", "upsert", "update", "fork"):
            return action, m
        if action == "delete":
            return "delete", m
    elif method == "DELETE" and collection is not None and action is None:
        return "delete", m
    return None, None


@dataclass(frozen=True)
class Limits:
    """One user's effective limits (0: off).  Units: MB, collections, records, requests/s,
    requests, requests in flight, MB."""

    user_max_disk_mb: int = 0
    user_max_collections: int = 0
    user_max_records_per_collection: int = 0
    user_requests_per_second: int = 0
    user_request_burst: int = 0
    user_max_concurrent_requests: int = 0
    user_max_memory_mb: int = 0
    active: bool = field(init=False, default=False)  # any limit on
    needs_kind: bool = field(init=False, default=False)  # a limit that depends on the route

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "needs_kind",
            bool(
                self.user_max_disk_mb
                or self.user_max_collections
                or self.user_max_records_per_collection
            ),
        )
        object.__setattr__(
            self,
            "active",
            self.needs_kind
            or bool(self.user_requests_per_second or self.user_max_concurrent_requests),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(**{name: getattr(settings, name) for name in LIMIT_KEYS.values()})

    def with_overrides(self, overrides: Mapping[str, int]) -> Limits:
        """These limits with ``overrides`` (YAML key -> value) applied."""
        values = {name: getattr(self, name) for name in LIMIT_KEYS.values()}
        values.update({LIMIT_KEYS[k]: v for k, v in overrides.items()})
        return Limits(**values)

    def as_keys(self) -> dict[str, int]:
        """``{YAML key: value}`` (the shape of the admin API and ``limits.json``)."""
        return {key: getattr(self, name) for key, name in LIMIT_KEYS.items()}

    @property
    def bucket_size(self) -> int:
        """Tokens the bucket holds: ``userRequestBurst``, else ``userRequestsPerSecond``."""
        return self.user_request_burst or self.user_requests_per_second


# The largest override value (2**53 - 1: exact as a JSON number anywhere, and as a float in the
# token bucket's arithmetic).  Any real limit is far below it.
MAX_LIMIT_VALUE = 2**53 - 1


def check_overrides(doc: object) -> dict[str, int | None]:
    """Validate an override document ``{key: int >= 0 | null}``; raises ValueError naming the
    first bad key or value."""
    if not isinstance(doc, dict):
        raise ValueError("limits must be a JSON object of setting names to numbers")
    out: dict[str, int | None] = {}
    for key, value in doc.items():
        if key not in LIMIT_KEYS:
            raise ValueError(f"unknown limit {key!r} (known: {', '.join(LIMIT_KEYS)})")
        if value is not None and (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value <= MAX_LIMIT_VALUE
        ):
            raise ValueError(
                f"{key}: expected an integer from 0 to {MAX_LIMIT_VALUE} or null, got {value!r}"
            )
        out[key] = value
    return out


class Overrides:
    """Per-user limit overrides, persisted as ``{userId: {key: value}}`` in ``path``
    (``<dbPath>/.stcs/limits.json``; written atomically: write, then rename)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raw = {}
        self.users: dict[str, dict[str, int]] = {}
        for user_id, doc in raw.items():
            checked = check_overrides(doc)
            self.users[user_id] = {k: v for k, v in checked.items() if v is not None}

    def set(self, user_id: str, overrides: Mapping[str, int]) -> None:
        """Replace ``user_id``'s overrides (empty: none) and save."""
        if overrides:
            self.users[user_id] = dict(overrides)
        else:
            self.users.pop(user_id, None)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.users, indent=1, sort_keys=True))
        tmp.replace(self._path)


# -- disk usage -------------------------------------------------------------------------------


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


# -- the request path -------------------------------------------------------------------------


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class _Slots:
    __slots__ = ("in_flight", "waiters")

    def __init__(self) -> None:
        self.in_flight = 0
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()


class Admission:
    """One admitted request's obligations (from `Quotas.admit`).

    Call `check_write` after the instance lease (before forwarding) and `done` exactly once
    when the request ends, whatever happened in between.
    """

    __slots__ = ("_done", "_kind", "_limits", "_match", "_quotas", "_slots", "_user_id")

    def __init__(
        self,
        quotas: Quotas | None,
        user_id: str,
        limits: Limits,
        kind: str | None,
        match: re.Match[str] | None,
        slots: _Slots | None,
    ) -> None:
        self._quotas = quotas
        self._user_id = user_id
        self._limits = limits
        self._kind = kind
        self._match = match
        self._slots = slots
        self._done = False

    async def check_write(self, port: int) -> None:
        """Check ``userMaxCollections`` / ``userMaxRecordsPerCollection`` against the counts of
        the chroma instance on ``127.0.0.1:port`` (one local GET, only for a create, fork, add
        or upsert with that limit on).  Raises QuotaExceededError.  When the count cannot be
        read the request passes: chroma answers it (e.g. 404 for an unknown collection)."""
        if self._kind is None or self._quotas is None:
            return
        await self._quotas._check_counts(self._limits, self._kind, self._match, port)

    def done(self, status: int) -> None:
        """The request ended with HTTP ``status`` (0: no response): free its concurrency slot
        and, after a write or delete of a user with ``userMaxDiskMB``, measure the user's size
        again (in a thread).  Idempotent."""
        if self._done or self._quotas is None:
            return
        self._done = True
        if self._slots is not None:
            self._quotas._release(self._slots)
        if self._kind is not None and self._limits.user_max_disk_mb:
            self._quotas.refresh_disk(self._user_id)


NO_ADMISSION = Admission(None, "", Limits(), None, None, None)


class Quotas:
    """Per-user limits of one stcs application (see the module docstring).

    ``db_dir``: the directory of the users' data directories (``dbPath``); the overrides are
    ``<db_dir>/.stcs/limits.json``.  Call `start` once a loop runs and `close` at shutdown.
    """

    def __init__(
        self,
        settings: Settings,
        db_dir: Path,
        metrics: Metrics,
        clock: Any = time.monotonic,
    ) -> None:
        self.defaults = Limits.from_settings(settings)
        self.db_dir = db_dir
        self.overrides = Overrides(Layout(db_dir).limits)
        self.concurrency_timeout = settings.user_concurrency_timeout / 1000
        self.disk_interval = settings.user_disk_check_interval / 1000
        self.metrics = metrics
        self.clock = clock
        self.disk: dict[str, int] = {}  # user id -> bytes (`data_size`), the last measurement
        self._by_user: dict[str, Limits] = {}  # users with overrides: their merged limits
        self._buckets: dict[str, _Bucket] = {}
        self._slots: dict[str, _Slots] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []  # the initial measurement, the ticker
        self._merge_all()

    # -- limits -------------------------------------------------------------------------------

    def _merge_all(self) -> None:
        self._by_user = {
            user_id: self.defaults.with_overrides(doc)
            for user_id, doc in self.overrides.users.items()
        }

    def limits_for(self, user_id: str) -> Limits:
        """``user_id``'s effective limits: the settings with the user's overrides applied."""
        return self._by_user.get(user_id, self.defaults)

    def set_overrides(self, user_id: str, overrides: Mapping[str, int]) -> None:
        """Replace ``user_id``'s overrides (YAML key -> value; empty: none), save them and
        apply them to the user's next request."""
        self.overrides.set(user_id, overrides)
        self._merge_all()
        if self.limits_for(user_id).user_max_disk_mb and user_id not in self.disk:
            self.refresh_disk(user_id)

    @property
    def disk_limited(self) -> bool:
        """Whether any user has a ``userMaxDiskMB``."""
        return bool(self.defaults.user_max_disk_mb) or any(
            lim.user_max_disk_mb for lim in self._by_user.values()
        )

    def usage(self, user_id: str) -> dict[str, Any]:
        """``{"diskBytes": bytes | None (not measured yet), "inFlight": n}`` (requests counted
        by ``userMaxConcurrentRequests``, 0 while it is off)."""
        slots = self._slots.get(user_id)
        return {"diskBytes": self.disk.get(user_id), "inFlight": slots.in_flight if slots else 0}

    # -- the hooks ----------------------------------------------------------------------------

    async def admit(self, user_id: str, method: str, path: str) -> Admission:
        """Admit one request of ``user_id`` (``path`` as sent, a query string allowed), before
        its instance lease.

        Checks, in order: the token bucket (``userRequestsPerSecond``/``userRequestBurst``), the
        cached disk size for a write (``userMaxDiskMB``), a concurrency slot
        (``userMaxConcurrentRequests``; waits up to ``userConcurrencyTimeout`` ms).  Raises
        UserRateLimitError (429, ``Retry-After``) or QuotaExceededError (422).  Never touches
        the disk.  Cost with every limit off: one dict lookup.
        """
        limits = self._by_user.get(user_id, self.defaults)
        if not limits.active:
            return NO_ADMISSION
        kind: str | None = None
        match: re.Match[str] | None = None
        if limits.needs_kind:
            kind, match = classify(method, path)
        if limits.user_requests_per_second:
            self._take_token(user_id, limits)
        if limits.user_max_disk_mb and kind in WRITES:
            used = self.disk.get(user_id)
            limit = limits.user_max_disk_mb * MB
            if used is None:
                self.refresh_disk(user_id)  # not measured yet: let it pass, measure now
            elif used >= limit:
                self._reject("disk")
                raise QuotaExceededError(
                    "disk",
                    f"userMaxDiskMB is {limits.user_max_disk_mb} MB and this user's data takes "
                    f"{used / MB:.1f} MB; delete records or collections to write again",
                )
        slots: _Slots | None = None
        if limits.user_max_concurrent_requests:
            slots = await self._take_slot(user_id, limits.user_max_concurrent_requests)
        if slots is None and kind is None:
            return NO_ADMISSION
        return Admission(self, user_id, limits, kind, match, slots)

    def _reject(self, kind: str) -> None:
        self.metrics.quota_rejections.labels(kind).inc()

    def _take_token(self, user_id: str, limits: Limits) -> None:
        rate = limits.user_requests_per_second
        size = limits.bucket_size
        now = self.clock()
        bucket = self._buckets.get(user_id)
        if bucket is None:
            bucket = self._buckets[user_id] = _Bucket(size, now)
        else:
            bucket.tokens = min(size, bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return
        self._reject("rate")
        raise UserRateLimitError(
            "rate",
            f"rate limit: userRequestsPerSecond is {rate} (burst {size}) for this user",
            math.ceil((1 - bucket.tokens) / rate),
        )

    async def _take_slot(self, user_id: str, limit: int) -> _Slots:
        slots = self._slots.get(user_id)
        if slots is None:
            slots = self._slots[user_id] = _Slots()
        if slots.in_flight < limit and not slots.waiters:
            slots.in_flight += 1
            return slots
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        slots.waiters.append(waiter)
        try:
            await asyncio.wait((waiter,), timeout=self.concurrency_timeout)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release(slots)  # handed a slot while being cancelled: pass it on
            waiter.cancel()
            with contextlib.suppress(ValueError):
                slots.waiters.remove(waiter)
            raise
        if waiter.done():
            return slots  # `_release` handed its slot over (in_flight unchanged)
        waiter.cancel()
        with contextlib.suppress(ValueError):
            slots.waiters.remove(waiter)
        self._reject("concurrency")
        raise UserRateLimitError(
            "concurrency",
            f"too many requests in flight: userMaxConcurrentRequests is {limit} for this user",
            1,
        )

    def _release(self, slots: _Slots) -> None:
        while slots.waiters:
            waiter = slots.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes to the longest waiter
                return
        slots.in_flight -= 1

    async def _check_counts(
        self, limits: Limits, kind: str, match: re.Match[str] | None, port: int
    ) -> None:
        if match is None:
            return
        tenant, database, collection = match.group(1), match.group(2), match.group(3)
        base = f"http://127.0.0.1:{port}/api/v2/tenants/{tenant}/databases/{database}"
        if kind in ("create", "fork") and limits.user_max_collections:
            count = await self._count(f"{base}/collections_count")
            if count is not None and count >= limits.user_max_collections:
                self._reject("collections")
                raise QuotaExceededError(
                    "collections",
                    f"userMaxCollections is {limits.user_max_collections} and this database "
                    f"has {count} collections",
                )
        elif kind in ("add", "upsert") and limits.user_max_records_per_collection:
            count = await self._count(f"{base}/collections/{collection}/count")
            if count is not None and count >= limits.user_max_records_per_collection:
                self._reject("records")
                raise QuotaExceededError(
                    "records",
                    f"userMaxRecordsPerCollection is {limits.user_max_records_per_collection} "
                    f"and this collection holds {count} records",
                )

    async def _count(self, url: str) -> int | None:
        """chroma's answer to a count endpoint (a JSON integer), None if there is none."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        try:
            async with self._session.get(url, timeout=_COUNT_TIMEOUT) as resp:
                if resp.status != 200:
                    return None
                value = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return None
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    # -- disk ---------------------------------------------------------------------------------

    def refresh_disk(self, user_id: str) -> None:
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
                self.disk[user_id] = await asyncio.to_thread(data_size, self.db_dir / user_id)
                if user_id not in self._dirty:
                    return
        except Exception:
            log.exception("measuring a user's data failed", user_id=user_id)
        finally:
            self._refreshing.pop(user_id, None)

    async def measure_all(self) -> None:
        """Measure every user's data (in a thread) and replace the cached sizes."""
        self.disk = await asyncio.to_thread(measure_all, self.db_dir)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.disk_interval)
            try:
                await self.measure_all()
            except Exception:
                log.exception("measuring the users' data failed")
            self._prune()

    def _prune(self) -> None:
        """Forget buckets that are full again and idle slot counters (bounded memory)."""
        now = self.clock()
        for user_id, bucket in list(self._buckets.items()):
            limits = self.limits_for(user_id)
            rate = limits.user_requests_per_second
            if not rate or bucket.tokens + (now - bucket.stamp) * rate >= limits.bucket_size:
                del self._buckets[user_id]
        for user_id, slots in list(self._slots.items()):
            if not slots.in_flight and not slots.waiters:
                del self._slots[user_id]

    async def start(self) -> None:
        """Measure every user's data once (awaited when a disk limit is set, so the quota holds
        from the first request after a restart), then every ``userDiskCheckInterval``."""
        loop = asyncio.get_running_loop()
        if self.disk_limited:
            await self.measure_all()
        else:
            self._tasks.append(loop.create_task(self.measure_all()))
        self._tasks.append(loop.create_task(self._tick()))

    async def close(self) -> None:
        """Stop measuring and close the count session."""
        tasks = [*self._tasks, *self._refreshing.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def sizes(self) -> Iterable[int]:
        """The last measured size of every user's data (bytes), for the metrics."""
        return list(self.disk.values())
