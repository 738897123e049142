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
        await admission.check_write(child, body)            # after the lease, before forwarding
        ...forward...
    finally:
        admission.done(status)                              # exactly once

Per-user overrides are kept in ``<dbPath>/.stcs/limits.json`` as ``{userId: {key: value}}``
with the settings' YAML keys, so they survive restarts.

The package: `limits` (the limit model and the overrides), `disk` (what a user's data costs on
disk, measured off the event loop), `admission` (the request path: `Quotas`, `Admission`).
Which chroma route is a write is `stcs.chroma_api.classify`'s; chroma's counts are asked
through the one client to the children, `stcs.upstream.UpstreamPool`.
"""

from stcs.quotas.admission import NO_ADMISSION, WRITE_QUEUE_TIMEOUT_S, Admission, Quotas
from stcs.quotas.disk import (
    DiskUsage,
    collection_count,
    collection_exists,
    data_size,
    measure_all,
    user_dirs,
)
from stcs.quotas.limits import (
    CLIENT_START_BURST,
    LIMIT_KEYS,
    MAX_LIMIT_VALUE,
    Limits,
    Overrides,
    check_overrides,
)

__all__ = [
    "CLIENT_START_BURST",
    "LIMIT_KEYS",
    "MAX_LIMIT_VALUE",
    "NO_ADMISSION",
    "WRITE_QUEUE_TIMEOUT_S",
    "Admission",
    "DiskUsage",
    "Limits",
    "Overrides",
    "Quotas",
    "check_overrides",
    "collection_count",
    "collection_exists",
    "data_size",
    "measure_all",
    "user_dirs",
]
