"""Admission: the per-user limits on the request path (`Quotas.admit`, `Admission`).

The token bucket, the concurrency slots, the user's write lock and the checks of a write
against the disk, collection and record limits (see `stcs.quotas`)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import orjson
import structlog

from stcs import chroma_api
from stcs.chroma_api import NEW_COLLECTION, NEW_RECORDS, WRITES, body_ids, classify
from stcs.config import Settings
from stcs.errors import BadRequestError, QuotaExceededError, UserRateLimitError
from stcs.layout import Layout
from stcs.quotas.disk import DiskUsage, collection_count, collection_exists
from stcs.quotas.limits import Limits, Overrides
from stcs.recorder import NULL_RECORDER, Recorder
from stcs.upstream import Target, UpstreamPool

log = structlog.get_logger("stcs.quotas")

MB = 1024 * 1024

# Bound on a write's wait for the user's earlier writes (the write lock).  Generous: a 100 MB add
# can take chroma tens of seconds; only the user's own writes queue here.
WRITE_QUEUE_TIMEOUT_S = 120.0
# Bodies up to this size are parsed on the event loop (tens of µs); larger ones in a thread.
_PARSE_INLINE = 64 * 1024


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
        return (kind in NEW_RECORDS and bool(limits.user_max_records_per_collection)) or (
            kind == "create" and bool(limits.user_max_collections)
        )

    async def check_write(self, child: Target, body: bytes | None = None) -> None:
        """For a write of a user with a disk, collection or record limit: wait for the user's
        write lock (held until `done`), then check ``userMaxDiskMB`` against a measurement
        taken after the user's last write, ``userMaxCollections`` against the collections in
        all the user's tenants and databases, ``userMaxRecordsPerCollection`` against chroma's
        count (asked of ``child``, the leased incarnation) plus the ids in ``body``.  Raises
        QuotaExceededError, BadRequestError (an add/upsert body whose ids cannot be counted),
        UserRateLimitError
        (the user's earlier writes held the lock `WRITE_QUEUE_TIMEOUT_S`).  A count chroma
        cannot give lets the request pass: chroma answers it (e.g. 404).  Once per request
        (a retry on a fresh instance is not checked again)."""
        if self._kind not in WRITES or self._quotas is None or self._checked:
            return
        self._checked = True
        self._lock = await self._quotas._lock_writes(self._user_id)
        await self._quotas._check_write(
            self._user_id, self._limits, self._kind, self._match, child, body
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
            self._quotas.disk.refresh(self._user_id)
        if self._lock is not None:
            self._lock.release()
            self._lock = None


NO_ADMISSION = Admission(None, "", Limits(), None, None, None)


class Quotas:
    """Per-user limits of one stcs application (see the module docstring).

    ``db_dir``: the directory of the users' data directories (``dbPath``); the overrides are
    ``<db_dir>/.stcs/limits.json``.  ``pool`` asks chroma for counts (`stcs.chroma_api`);
    ``recorder`` is told each refusal.  Call `start` once a loop runs and `close` at shutdown.
    """

    def __init__(
        self,
        settings: Settings,
        db_dir: Path,
        pool: UpstreamPool,
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
        self.disk = DiskUsage(db_dir, clock)  # each user's size, as last measured
        self._pool = pool
        self._by_user: dict[str, Limits] = {}  # users with overrides: their merged limits
        self._buckets: dict[str, _Bucket] = {}
        self._slots: dict[str, _Slots] = {}
        self._write_locks: dict[str, asyncio.Lock] = {}  # user id -> its write lock
        self._write_waiting: collections.Counter[str] = collections.Counter()
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
        if self.limits_for(user_id).user_max_disk_mb and self.disk.get(user_id) is None:
            self.disk.refresh(user_id)

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
                self.disk.refresh(user_id)  # not measured yet: let it pass, measure now
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

    def admit_now(self, user_id: str, method: bytes, path: bytes) -> Admission | None:
        """`admit`'s answer when it needs no step with an effect (a token, a slot, a disk
        measurement): with every limit off, or with only route limits (disk, collections,
        records) for a request that is not a write.  None otherwise: then `admit` decides.
        ``method`` and ``path`` as sent (bytes, Latin-1).  Takes nothing."""
        limits = self._by_user.get(user_id, self.defaults)
        if not limits.active:
            return NO_ADMISSION
        if limits.user_requests_per_second or limits.user_max_concurrent_requests:
            return None
        kind, match = classify(method.decode("latin-1"), path.decode("latin-1"))
        if kind in WRITES:
            return None  # the cached size, the user's write lock, chroma's counts
        return NO_ADMISSION if kind is None else Admission(self, user_id, limits, kind, match, None)

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
        child: Target,
        body: bytes | None,
    ) -> None:
        """The checks of `Admission.check_write`, under the user's write lock."""
        if limits.user_max_disk_mb:
            used = await self.disk.fresh(user_id)
            if used is not None and used >= limits.user_max_disk_mb * MB:
                self._reject("disk")
                raise QuotaExceededError(
                    "disk",
                    f"userMaxDiskMB is {limits.user_max_disk_mb} MB and this user's data takes "
                    f"{used / MB:.1f} MB; delete records or collections to write again",
                )
        if kind in NEW_COLLECTION and limits.user_max_collections:
            await self._check_collections(user_id, limits.user_max_collections, kind, match, body)
        elif kind in NEW_RECORDS and limits.user_max_records_per_collection and match:
            await self._check_records(limits.user_max_records_per_collection, kind, match, child,
                                      body)  # fmt: skip

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
        self, limit: int, kind: str, match: re.Match[str], child: Target, body: bytes | None
    ) -> None:
        count = await chroma_api.record_count(self._pool, child, match)
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
            # upserting records that exist adds none
            adding -= await chroma_api.existing_count(self._pool, child, match, ids)
        if count + adding > limit:
            self._reject("records")
            raise QuotaExceededError(
                "records",
                f"userMaxRecordsPerCollection is {limit} and this collection holds {count} "
                f"records; this request adds {adding}",
            )

    # -- disk ---------------------------------------------------------------------------------

    async def measure_all(self) -> None:
        """Measure every user's data again (`DiskUsage.measure_all`)."""
        await self.disk.measure_all()

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
        self.disk.prune()

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
        """Stop measuring."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.disk.close()

    def sizes(self) -> Iterable[int]:
        """The last measured size of every user's data (bytes), for the metrics."""
        return self.disk.values()
