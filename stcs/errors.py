"""Typed errors of stcs.

Every error a request can meet is one of the `HTTPError` subclasses below.  Each carries the
HTTP status and the chroma error *name* of DESIGN.md's error table; `relay.error_response` (data
plane) and `app.request_middleware` (control plane) turn them into responses, with chroma's
body shape ``{"error": NAME, "message": TEXT}``.  The names are keys of
``chromadb.errors.error_types``, so the unmodified Python client raises the matching
exception (``ChromaAuthError`` for ``AuthError``, ``RateLimitError``, ``InternalError``, ...).

`ConfigError` and `LockHeldError` are start-up errors; `cli` turns them into exit code 2.
"""

from __future__ import annotations

from typing import ClassVar


class StcsError(Exception):
    """Base of all stcs errors."""


class ConfigError(StcsError):
    """A setting is unknown, has the wrong type or an invalid value; the message names it."""


class LockHeldError(StcsError):
    """Another process holds the `dbPath` lock (another stcs serves the same data)."""


class HTTPError(StcsError):
    """An error answered to the client.

    `status` is the HTTP status; `error` the chroma error name put in the body; `headers` extra
    response headers (e.g. ``Retry-After``).  The message is sent to the client: it must never
    contain a token or key.
    """

    status: ClassVar[int] = 500
    error: ClassVar[str] = "InternalError"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class AuthError(HTTPError):
    """No token, a malformed one, or one rejected (auth server 401/403, or not a UUID)."""

    status = 401
    error = "AuthError"


class AuthUnavailableError(HTTPError):
    """The auth server could not give an answer: unreachable, timed out, 5xx or malformed body.

    Never reported as 401: the token may well be valid.
    """

    status = 503
    error = "InternalError"


class LookupsSaturatedError(AuthUnavailableError):
    """``authMaxConcurrentLookups`` lookups were in flight for all of ``authTimeout``."""


class InvalidUserIdError(HTTPError):
    """The auth server returned a user id that is not usable as a directory name."""

    status = 502
    error = "InternalError"


class CapacityTimeoutError(HTTPError):
    """No instance slot (``dbMaxInstances`` / ``dbMinFreeMemoryMB``) within ``queueTimeout``."""

    status = 503
    error = "RateLimitError"


class StartFailedError(HTTPError):
    """The user's chroma server could not be started (after ``dbMaxRetries`` retries)."""

    status = 503
    error = "InternalError"


class DirectoryLockedError(StartFailedError):
    """The user's data directory is locked by another process (a backup, another stcs): the
    start failed without spawning anything, so it does not count toward the back-off."""


class StartBackoffError(StartFailedError):
    """The user's recent starts failed (or their chroma crashed soon after starting): no new
    start is tried until the back-off ends; answered at once with ``Retry-After``."""


class ShuttingDownError(HTTPError):
    """stcs is shutting down and takes no new work."""

    status = 503
    error = "InternalError"


class UpstreamError(HTTPError):
    """The user's chroma server died mid-request or answered with a broken response."""

    status = 502
    error = "InternalError"


class BodyTooLargeError(HTTPError):
    """Request body over ``maxBodySize`` bytes.

    Named ``InvalidArgumentError`` (not DESIGN.md's ``InvalidArgument``): that is the name chroma
    itself sends and the only one ``chromadb.errors.error_types`` maps to ``InvalidArgumentError``.
    """

    status = 413
    error = "InvalidArgumentError"


class AdminForbiddenError(HTTPError):
    """Admin endpoint called without the right ``x-api-key``."""

    status = 403
    error = "AuthorizationError"


class UserBlockedError(HTTPError):
    """The user is on the admin blocklist (``POST /admin/users/{userId}/block``)."""

    status = 403
    error = "AuthorizationError"


class BadAdminRequestError(HTTPError):
    """An admin call with an unusable argument (user id, seconds) or that could not finish
    (requests still in flight after ``drainTimeout``)."""

    status = 400
    error = "InvalidArgumentError"


class NoInstanceError(HTTPError):
    """An admin call about a user whose instance is not running."""

    status = 404
    error = "NotFoundError"


class AdminDisabledError(HTTPError):
    """Admin endpoint called while no ``adminAPIKey`` is configured (as the Node.js server: 404)."""

    status = 404
    error = "NotFoundError"


class BadRequestError(HTTPError):
    """A request stcs will not relay: malformed framing (RFC 9112 §6.3: Content-Length with
    Transfer-Encoding, several Content-Lengths, bad chunks), a target that is not origin-form
    (absolute-form, ``*``), ``CONNECT`` or ``Upgrade``.  The connection is closed after it."""

    status = 400
    error = "InvalidArgumentError"


class RequestTimeoutError(HTTPError):
    """The client did not send its request head within ``headersTimeout`` or paused its body
    longer than ``bodyTimeout`` (RFC 9110 §15.5.9).  The connection is closed after it."""

    status = 408
    error = "InvalidArgumentError"


class HeadTooLargeError(HTTPError):
    """Request head over ``maxHeaderSize`` bytes or ``maxHeadersCount`` lines (RFC 6585 §5)."""

    status = 431
    error = "InvalidArgumentError"


class UnsupportedCodingError(HTTPError):
    """A transfer coding other than ``chunked`` (RFC 9112 §6.1: a server that does not
    understand a coding answers 501)."""

    status = 501
    error = "InvalidArgumentError"


class TooManyConnectionsError(HTTPError):
    """More than ``maxConnections`` client connections are open."""

    status = 503
    error = "RateLimitError"


class QuotaExceededError(HTTPError):
    """A write refused by a per-user quota (``userMaxDiskMB``, ``userMaxCollections``,
    ``userMaxRecordsPerCollection``; `stcs.quotas`).

    422 with ``{"error": "QuotaError"}``: the Python client (chromadb 1.x) maps the name to
    ``chromadb.errors.QuotaError``; the JS client (``chromadb`` 3.x, ``chroma-fetch.ts``) maps a
    422 whose message starts with "Quota exceeded" to ``ChromaQuotaExceededError``, so every
    message starts so.  ``limit`` names the limit for metrics ("disk", "collections", "records").
    """

    status = 422
    error = "QuotaError"

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(f"Quota exceeded: {message}")
        self.limit = limit


class UserRateLimitError(HTTPError):
    """A request refused by a per-user rate (``userRequestsPerSecond``) or concurrency
    (``userMaxConcurrentRequests``) limit, with ``Retry-After`` in seconds.

    429 with ``{"error": "RateLimitError"}``: the Python client maps the name to
    ``chromadb.errors.RateLimitError``, the JS client maps status 429 to ``ChromaRateLimitError``.
    ``limit`` is "rate" or "concurrency" (metrics).
    """

    status = 429
    error = "RateLimitError"

    def __init__(self, limit: str, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_s))})
        self.limit = limit
