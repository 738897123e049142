"""Per-user quotas and rate limits: one tenant cannot starve the others.

The limits (settings, 0 is off, each overridable per user):

* ``userMaxDiskMB`` — a user's data directory size.  Every request that can store data (see
  `classify`: collection create and modify, add, upsert, update, fork, tenant and database
  creation, and any route not known to be a read or a delete) is refused with 422
  ``QuotaError`` while the user is at or over it; reads and deletes keep working, so a user can
  always get back under.  The size is measured off the event loop (`data_size` in a thread)
  every ``userDiskCheckInterval`` ms and after each of the user's writes and deletes.
* ``userMaxCollections`` — collections in every tenant and database of the user's chroma
  (its ``chroma.sqlite3``), checked when a collection is created or forked.
* ``userMaxRecordsPerCollection`` — chroma's own count (``collections/{id}/count``) plus the ids
  an add or upsert carries (its body is read whole and parsed to count them) must stay within it.
* ``userRequestsPerSecond`` + ``userRequestBurst`` — a token bucket per user (not per
  connection); beyond it 429 ``RateLimitError`` with ``Retry-After``.  The bucket holds at least
  `CLIENT_START_BURST` requests unless ``userRequestBurst`` says otherwise: a chromadb client
  costs 3 requests to construct.
* ``userMaxConcurrentRequests`` — a user's requests in flight; more wait up to
  ``userConcurrencyTimeout`` ms in FIFO order, then 429 ``RateLimitError``.

While a disk, collection or record limit is on, one user's writes are serialised: each takes
the user's write lock after its instance lease and holds it until it is answered, and is
checked against a measurement taken after the write before it.  So concurrent writes cannot all
pass one stale check: records and collections never pass their limits, and the disk passes
its limit by at most what one write stores.  Reads and deletes never take the lock.

The request path uses two hooks that take plain values (no aiohttp request objects), so any
front end — today's aiohttp handler, a protocol-level relay — calls them the same way::

    admission = await quotas.admit(user_id, method, path)   # before the instance lease
    try:
        ...lease the instance...
        if admission.wants_body: body = ...the whole body...
        await admission.check_write(port, body)             # after the lease, before forwarding
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
import orjson
import structlog

from stcs.config import Settings
from stcs.errors import BadRequestError, QuotaExceededError, UserRateLimitError
from stcs.layout import Layout
from stcs.recorder import NULL_RECORDER, Recorder

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


# chroma 1.5's v2 API (its /openapi.json, `chroma run` 1.5.9), as quotas see it:
#
#   reads (None): every GET and HEAD (identity, heartbeat, version, pre-flight-checks,
#     healthcheck, get tenant/database/collection, list, count, fork_count, indexing_status,
#     attached functions), and POST .../collections/{id}/get | query | search (read-only
#     bodies).
#   deletes ("delete", measured again after): every DELETE (database, collection), POST
#     .../collections/{id}/delete (records), POST /api/v2/reset.
#   writes, checked against userMaxDiskMB: POST .../collections ("create": also
#     userMaxCollections), POST .../{id}/add and /upsert ("add", "upsert": also
#     userMaxRecordsPerCollection), POST .../{id}/fork ("fork": a new collection), and
#     everything else ("write"): PUT .../collections/{id} (modify: name, metadata,
#     configuration), POST .../{id}/update, POST /api/v2/tenants, PATCH /api/v2/tenants/{t},
#     POST .../databases, POST .../functions/attach, .../attached_functions/{name}/detach, and
#     any route a later chroma adds — unknown routes are writes, so a new way to store data is
#     refused over the quota rather than missed.
# Group 1: tenant, 2: database, 3: the collection id (or name, for DELETE), 4: the action.
_COLLECTIONS_RE = re.compile(
    r"/api/v2/tenants/([^/]+)/databases/([^/]+)/collections(?:/([^/]+)(?:/([a-z_]+))?)?/?"
)
_READ_ACTIONS = frozenset(("get", "query", "search"))
_RESET = "/api/v2/reset"
WRITES = frozenset(("create", "add", "upsert", "fork", "write"))
_NEW_COLLECTION = frozenset(("create", "fork"))
_NEW_RECORDS = frozenset(("add", "upsert"))

_COUNT_TIMEOUT = aiohttp.ClientTimeout(total=5, connect=1)
# Bound on a write's wait for the user's earlier writes (the write lock).  Generous: a 100 MB add
# can take chroma tens of seconds; only the user's own writes queue here.
WRITE_QUEUE_TIMEOUT_S = 120.0
# Smallest token bucket unless userRequestBurst is set: a chromadb 1.5 client's start-up is 3
# requests (auth/identity, tenant, database), get_or_create_collection 1, its first write 2
# (pre-flight-checks, the write): 6, with room for a retry or a second client.
CLIENT_START_BURST = 10
# Bodies up to this size are parsed on the event loop (tens of µs); larger ones in a thread.
_PARSE_INLINE = 64 * 1024


def classify(method: str, path: str) -> tuple[str | None, re.Match[str] | None]:
    """Which chroma operation ``method path`` is, as far as quotas care (the table above).

    Returns ``(kind, match)``: kind is "create" | "add" | "upsert" | "fork" | "write" (writes,
    refused over ``userMaxDiskMB``), "delete" (frees space: the size is measured again after it)
    or None (reads).  ``match`` is the collections route's match, when it is one.  ``path`` may
    carry a query string.
    """
    if method == "GET" or method == "HEAD":
        return None, None
    if method == "DELETE":
        return "delete", None
    path = path.partition("?")[0]
    m = _COLLECTIONS_RE.fullmatch(path)
    if m is None:
        if method == "POST" and path.rstrip("/") == _RESET:
            return "delete", None
        return "write", None
    collection, action = m.group(3), m.group(4)
    if method == "POST":
        if collection is None:
            return "create", m
        if action in _READ_ACTIONS:
            return None, None
        if action == "delete":
            return "delete", m
        if action in ("add", "upsert", "fork"):
            return action, m
    return "write", m


def body_ids(body: bytes) -> list[Any] | None:
    """The ids of an add/upsert body (chroma's ``{"ids": [...], ...}``); None when it is not
    such a JSON object (chroma refuses it too)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    ids = doc.get("ids") if isinstance(doc, dict) else None
    return ids if isinstance(ids, list) else None


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
        """Tokens the bucket holds: ``userRequestBurst``, else the larger of
        ``userRequestsPerSecond`` and `CLIENT_START_BURST` (a client's start-up)."""
        return self.user_request_burst or max(self.user_requests_per_second, CLIENT_START_BURST)


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

    Call `check_write` after the instance lease (before forwarding; with the whole body when
    `wants_body`) and `done` exactly once when the request ends, whatever happened in between.
    """

    __slots__ = (
        "_checked", "_done", "_kind", "_limits", "_lock", "_match", "_quotas", "_slots",
        "_user_id",
    )  # fmt: skip

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
        self._checked = False
        self._lock: asyncio.Lock | None = None  # the user's write lock, while held

    @property
    def wants_body(self) -> bool:
        """Whether `check_write` needs the whole request body: an add/upsert under
        ``userMaxRecordsPerCollection`` (its ids are counted), a collection create under
        ``userMaxCollections`` (``get_or_create`` of an existing one creates nothing)."""
        kind, limits = self._kind, self._limits
        return (kind in _NEW_RECORDS and bool(limits.user_max_records_per_collection)) or (
            kind == "create" and bool(limits.user_max_collections)
        )

    async def check_write(self, port: int, body: bytes | None = None) -> None:
        """For a write of a user with a disk, collection or record limit: wait for the user's
        write lock (held until `done`), then check ``userMaxDiskMB`` against a measurement
        taken after the user's last write, ``userMaxCollections`` against the collections in
        all the user's tenants and databases, ``userMaxRecordsPerCollection`` against chroma's
        count (on ``127.0.0.1:port``) plus the ids in ``body``.  Raises QuotaExceededError,
        BadRequestError (an add/upsert body whose ids cannot be counted), UserRateLimitError
        (the user's earlier writes held the lock `WRITE_QUEUE_TIMEOUT_S`).  A count chroma
        cannot give lets the request pass: chroma answers it (e.g. 404).  Once per request
        (a retry on a fresh instance is not checked again)."""
        if self._kind not in WRITES or self._quotas is None or self._checked:
            return
        self._checked = True
        self._lock = await self._quotas._lock_writes(self._user_id)
        await self._quotas._check_write(
            self._user_id, self._limits, self._kind, self._match, port, body
        )

    def done(self, status: int) -> None:
        """The request ended with HTTP ``status`` (0: no response): free its concurrency slot
        and, after a write or delete of a user with ``userMaxDiskMB``, measure the user's size
        again (in a thread) — started before the write lock goes to the user's next write,
        which waits for it.  Idempotent."""
        if self._done or self._quotas is None:
            return
        self._done = True
        if self._slots is not None:
            self._quotas._release(self._slots)
        if self._kind is not None and self._limits.user_max_disk_mb:
            self._quotas.refresh_disk(self._user_id)
        if self._lock is not None:
            self._lock.release()
            self._lock = None


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
        recorder: Recorder = NULL_RECORDER,
        clock: Any = time.monotonic,
    ) -> None:
        self.defaults = Limits.from_settings(settings)
        self.db_dir = db_dir
        self.overrides = Overrides(Layout(db_dir).limits)
        self.concurrency_timeout = settings.user_concurrency_timeout / 1000
        self.disk_interval = settings.user_disk_check_interval / 1000
        self.recorder = recorder  # refusals, by limit (`Recorder.quota_rejection`)
        self.clock = clock
        self.disk: dict[str, int] = {}  # user id -> bytes (`data_size`), the last measurement
        self._by_user: dict[str, Limits] = {}  # users with overrides: their merged limits
        self._buckets: dict[str, _Bucket] = {}
        self._slots: dict[str, _Slots] = {}
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._measured_at: dict[str, float] = {}  # user id -> when its last refresh began
        self._write_locks: dict[str, asyncio.Lock] = {}  # user id -> its write lock
        self._write_waiting: collections.Counter[str] = collections.Counter()
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
        self.recorder.quota_rejection(kind)

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

    async def _lock_writes(self, user_id: str) -> asyncio.Lock:
        """Take ``user_id``'s write lock (FIFO, `asyncio.Lock`); the caller releases it.  Raises
        UserRateLimitError after `WRITE_QUEUE_TIMEOUT_S`."""
        lock = self._write_locks.get(user_id)
        if lock is None:
            lock = self._write_locks[user_id] = asyncio.Lock()
        self._write_waiting[user_id] += 1
        try:
            await asyncio.wait_for(lock.acquire(), WRITE_QUEUE_TIMEOUT_S)
        except asyncio.TimeoutError:
            self._reject("concurrency")
            raise UserRateLimitError(
                "concurrency",
                f"this user's earlier writes took over {WRITE_QUEUE_TIMEOUT_S:.0f} s",
                1,
            ) from None
        finally:
            self._write_waiting[user_id] -= 1
        return lock

    async def _check_write(
        self,
        user_id: str,
        limits: Limits,
        kind: str,
        match: re.Match[str] | None,
        port: int,
        body: bytes | None,
    ) -> None:
        """The checks of `Admission.check_write`, under the user's write lock."""
        if limits.user_max_disk_mb:
            used = await self._fresh_disk(user_id)
            if used is not None and used >= limits.user_max_disk_mb * MB:
                self._reject("disk")
                raise QuotaExceededError(
                    "disk",
                    f"userMaxDiskMB is {limits.user_max_disk_mb} MB and this user's data takes "
                    f"{used / MB:.1f} MB; delete records or collections to write again",
                )
        if kind in _NEW_COLLECTION and limits.user_max_collections:
            await self._check_collections(user_id, limits.user_max_collections, kind, match, body)
        elif kind in _NEW_RECORDS and limits.user_max_records_per_collection and match:
            await self._check_records(limits.user_max_records_per_collection, kind, match, port,
                                      body)  # fmt: skip

    async def _fresh_disk(self, user_id: str) -> int | None:
        """``user_id``'s size measured after their last write (waits for a measurement that is
        running or, if there is none yet, takes one).  None if it cannot be measured."""
        if user_id not in self.disk and user_id not in self._refreshing:
            self.refresh_disk(user_id)
        while (task := self._refreshing.get(user_id)) is not None:
            await asyncio.shield(task)  # a cancelled request must not cancel the measurement
        return self.disk.get(user_id)

    async def _check_collections(
        self,
        user_id: str,
        limit: int,
        kind: str,
        match: re.Match[str] | None,
        body: bytes | None,
    ) -> None:
        user_dir = self.db_dir / user_id
        count = await asyncio.to_thread(collection_count, user_dir)
        if count is None or count < limit:
            return
        if kind == "create" and match is not None and body is not None:
            # get_or_create of a collection that exists creates nothing: let it through.
            with contextlib.suppress(orjson.JSONDecodeError):
                doc = orjson.loads(body)
                if not isinstance(doc, dict):
                    doc = {}
                name = doc.get("name")
                if doc.get("get_or_create") is True and isinstance(name, str):
                    tenant, database = match.group(1), match.group(2)
                    if await asyncio.to_thread(collection_exists, user_dir, tenant, database, name):
                        return
        self._reject("collections")
        raise QuotaExceededError(
            "collections",
            f"userMaxCollections is {limit} and this user has {count} collections "
            "(in all their tenants and databases)",
        )

    async def _check_records(
        self, limit: int, kind: str, match: re.Match[str], port: int, body: bytes | None
    ) -> None:
        tenant, database, collection = match.group(1), match.group(2), match.group(3)
        url = (
            f"http://127.0.0.1:{port}/api/v2/tenants/{tenant}/databases/{database}"
            f"/collections/{collection}"
        )
        count = await self._count(f"{url}/count")
        if count is None:
            return
        ids: list[Any] | None = []  # no body: chroma refuses the request itself
        if body is not None and len(body) <= _PARSE_INLINE:
            ids = body_ids(body)
        elif body is not None:
            # Off the event loop; the parsed body costs a few times its size while counted,
            # one request per user at a time (the write lock).
            ids = await asyncio.to_thread(body_ids, body)
        if ids is None:
            raise BadRequestError("the request body is not a JSON object with a list of ids")
        adding = len(ids)
        if count + adding > limit and kind == "upsert":
            adding -= await self._existing(url, ids)  # upserting records that exist adds none
        if count + adding > limit:
            self._reject("records")
            raise QuotaExceededError(
                "records",
                f"userMaxRecordsPerCollection is {limit} and this collection holds {count} "
                f"records; this request adds {adding}",
            )

    async def _existing(self, url: str, ids: list[Any]) -> int:
        """How many of ``ids`` the collection at ``url`` already holds (chroma's ``get`` with
        ``include: []``); 0 when chroma cannot say."""
        session = self._client()
        try:
            async with session.post(
                f"{url}/get", json={"ids": ids, "include": []}, timeout=_COUNT_TIMEOUT
            ) as resp:
                if resp.status != 200:
                    return 0
                found = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return 0
        got = found.get("ids") if isinstance(found, dict) else None
        return len(got) if isinstance(got, list) else 0

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def _count(self, url: str) -> int | None:
        """chroma's answer to a count endpoint (a JSON integer), None if there is none."""
        try:
            async with self._client().get(url, timeout=_COUNT_TIMEOUT) as resp:
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
                self._measured_at[user_id] = self.clock()
                self.disk[user_id] = await asyncio.to_thread(data_size, self.db_dir / user_id)
                if user_id not in self._dirty:
                    return
        except Exception:
            log.exception("measuring a user's data failed", user_id=user_id)
        finally:
            self._refreshing.pop(user_id, None)

    async def measure_all(self) -> None:
        """Measure every user's data (in a thread) and replace the cached sizes, except those
        of users measured again since this began (the write lock relies on fresh ones)."""
        began = self.clock()
        sizes = await asyncio.to_thread(measure_all, self.db_dir)
        for user_id, at in self._measured_at.items():
            if (at >= began or user_id in self._refreshing) and user_id in self.disk:
                sizes[user_id] = self.disk[user_id]
        self.disk = sizes

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
        for user_id, lock in list(self._write_locks.items()):
            if not lock.locked() and not self._write_waiting[user_id]:
                del self._write_locks[user_id]
                del self._write_waiting[user_id]
        self._measured_at = {u: at for u, at in self._measured_at.items() if at >= now - 3600}

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
