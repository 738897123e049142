"""Typed errors of stcs: what went wrong, in the domain's words.

Nothing here knows HTTP.  The errors a request can meet are `RequestError` subclasses; each
edge turns them into a response through one table, `stcs.answers` (status, chroma error name,
``Retry-After``): `relay.error_response` on the data plane, `app.request_middleware` on the
control plane.  `ConfigError` and `LockHeldError` are start-up errors; `cli` turns them into exit
code 2.
"""

from __future__ import annotations


class StcsError(Exception):
    """Base of all stcs errors."""


class ConfigError(StcsError):
    """A setting is unknown, has the wrong type or an invalid value; the message names it."""


class LockHeldError(StcsError):
    """Another process holds the `dbPath` lock (another stcs serves the same data)."""


class RequestError(StcsError):
    """An error a request met, answered to its client (see `stcs.answers`).

    ``message`` is sent to the client: it must never contain a token or key.
    ``retry_after_s``, when set, is how many seconds (≥ 1) the client should wait before it
    tries again.
    """

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = None if retry_after_s is None else max(1, retry_after_s)


# -- the token and the user ------------------------------------------------------------------


class AuthError(RequestError):
    """No token, a malformed one, or one rejected (auth server 401/403, or not a UUID)."""


class UnknownUserError(AuthError):
    """``autoCreateUsers: false`` and the user has no directory (never added, or removed)."""


class AuthUnavailableError(RequestError):
    """The auth server could not give an answer: unreachable, timed out, 5xx or malformed body.

    Never reported as a rejected token: the token may well be valid.
    """


class LookupsSaturatedError(AuthUnavailableError):
    """``authMaxConcurrentLookups`` lookups were in flight for all of ``authTimeout``."""


class InvalidUserIdError(RequestError):
    """The auth server returned a user id that is not usable as a directory name."""


class UserBlockedError(RequestError):
    """The user is on the admin blocklist (``POST /admin/users/{userId}/block``)."""


# -- the user's instance ---------------------------------------------------------------------


class CapacityTimeoutError(RequestError):
    """No instance slot (``dbMaxInstances`` / ``dbMinFreeMemoryMB``) within ``queueTimeout``,
    or the user's instance held for maintenance that long; ``retry_after_s`` is set."""


class StartFailedError(RequestError):
    """The user's chroma server could not be started (after ``dbMaxRetries`` retries)."""


class DirectoryLockedError(StartFailedError):
    """The user's data directory is locked by another process (a backup, another stcs): the
    start failed without spawning anything, so it does not count toward the back-off."""


class StartBackoffError(StartFailedError):
    """The user's recent starts failed (or their chroma crashed soon after starting): no new
    start is tried until the back-off ends (``retry_after_s``)."""


class ShuttingDownError(RequestError):
    """stcs is shutting down and takes no new work."""


class UpstreamError(RequestError):
    """The user's chroma server died mid-request or answered with a broken response."""


class NewUsersRateLimitError(RequestError):
    """A never-seen user's start refused: the client address started
    ``addressNewUsersPerMinute`` new users already (its bucket is empty); ``retry_after_s`` is
    set."""


class LookupsPerAddressError(RequestError):
    """A token lookup refused: the client address already has ``authMaxLookupsPerAddress``
    lookups in flight; ``retry_after_s`` is set."""


# -- the cluster (stcs.placement) -------------------------------------------------------------


class NotOwnerError(RequestError):
    """A never-seen user whom the ring (``clusterNodes``) places on another node: refused
    before anything is created (the router has another node list, or a move is under way);
    ``retry_after_s`` is set."""


class UserMovingError(RequestError):
    """A user being moved to this node (refused until the copy is in) or moved away from it
    (never served from the stale copy); ``retry_after_s`` is set."""


# -- the request itself (refused at the edge) -------------------------------------------------


class BadRequestError(RequestError):
    """A request stcs will not relay: malformed framing (RFC 9112 §6.3: Content-Length with
    Transfer-Encoding, several Content-Lengths, bad chunks), a target that is not origin-form
    (absolute-form, ``*``), ``CONNECT`` or ``Upgrade``.  The connection is closed after it."""


class BodyTooLargeError(RequestError):
    """Request body over ``maxBodySize`` bytes."""


class RequestTimeoutError(RequestError):
    """The client did not send its request head within ``headersTimeout`` or paused its body
    longer than ``bodyTimeout`` (RFC 9110 §15.5.9).  The connection is closed after it."""


class HeadTooLargeError(RequestError):
    """Request head over ``maxHeaderSize`` bytes or ``maxHeadersCount`` lines (RFC 6585 §5)."""


class UnsupportedCodingError(RequestError):
    """A transfer coding other than ``chunked`` (RFC 9112 §6.1)."""


class TooManyConnectionsError(RequestError):
    """More than ``maxConnections`` client connections are open."""


# -- per-user limits (stcs.quotas) -------------------------------------------------------------


class QuotaExceededError(RequestError):
    """A write refused by a per-user quota (``userMaxDiskMB``, ``userMaxCollections``,
    ``userMaxRecordsPerCollection``; `stcs.quotas`).

    Every message starts with "Quota exceeded" (the JS client matches on it, see
    `stcs.answers`).  ``limit`` names the limit for metrics ("disk", "collections", "records").
    """

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(f"Quota exceeded: {message}")
        self.limit = limit


class MemoryLimitError(QuotaExceededError):
    """The user's chroma server used more memory than ``userMaxMemoryMB`` (PSS of its process
    tree, `stcs.memory`) and was stopped: its requests in flight, and the user's requests
    while their starts back off as after a crash (``retry_after_s``), get this.  The message
    names the limit."""

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__("memory", message)
        self.retry_after_s = None if retry_after_s is None else max(1, retry_after_s)


class UserRateLimitError(RequestError):
    """A request refused by a per-user rate (``userRequestsPerSecond``) or concurrency
    (``userMaxConcurrentRequests``) limit; ``retry_after_s`` is set.  ``limit`` is "rate" or
    "concurrency" (metrics)."""

    def __init__(self, limit: str, message: str, retry_after_s: int) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.limit = limit


# -- the admin API -----------------------------------------------------------------------------


class AdminDisabledError(RequestError):
    """Admin endpoint called while no ``adminAPIKey`` is configured."""


class AdminForbiddenError(RequestError):
    """Admin endpoint called without the right ``x-api-key``."""


class BadAdminRequestError(RequestError):
    """An admin call with an unusable argument (user id, seconds) or that could not finish
    (requests still in flight after ``drainTimeout``)."""


class NoInstanceError(RequestError):
    """An admin call about a user whose instance is not running."""


class NoUserDataError(RequestError):
    """An admin call about a user with no data directory on this node (``GET
    /admin/users/{userId}/manifest``)."""


class PlacementConflictError(RequestError):
    """An admin data call the user's placement mark forbids (`stcs.transfer`): an import or a
    prune into a user not marked ``arriving`` here (never overwrite a served or stale copy), a
    data removal for a user not marked ``moved``, or another such call for the user under way."""


class InsufficientStorageError(RequestError):
    """An import refused: the disk holding ``dbPath`` has less free space than the data
    announced plus a margin (`stcs.transfer.FREE_MARGIN_BYTES`); the message gives both."""
