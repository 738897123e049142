"""What a client is answered for each typed error: the one mapping of `stcs.errors` to HTTP.

Both edges use it: the relay (data plane, `relay.error_response`) and the control plane's
middleware (`app.request_middleware`).  The body is chroma's error shape ``{"error": NAME,
"message": TEXT}``; the names are keys of ``chromadb.errors.error_types``, so the unmodified
Python client raises the matching exception (``ChromaAuthError`` for ``AuthError``,
``RateLimitError``, ``QuotaError``, ``InternalError``, ...).  The README's error table lists
the same rows (tests/unit/test_answers.py checks it).

Notes on the choices:

* ``InvalidArgumentError`` (not the design's first ``InvalidArgument``): the name chroma sends,
  the only one ``error_types`` maps to ``InvalidArgumentError``.
* Auth server unavailable → 503, never 401: the token may well be valid.
* Quotas → 422 ``QuotaError``: the Python client (chromadb 1.x) maps the name to ``QuotaError``;
  the JS client (``chromadb`` 3.x, ``chroma-fetch.ts``) maps a 422 whose message starts with
  "Quota exceeded" to ``ChromaQuotaExceededError``.  ``userMaxMemoryMB`` is such a quota
  too (422 ``QuotaError``, with ``Retry-After``: the crash-loop back-off): the tenant's own
  use stopped its chroma, so a 4xx (not a 503 that alerts on server faults and that retrying
  clients and proxies treat as the server's) and the exception both clients raise for quotas.
  Per-user rate/concurrency → 429: the JS client maps the status to ``ChromaRateLimitError``.
* Admin endpoints without an ``adminAPIKey`` → 404, as the Node.js server.
* Cluster refusals (a user being moved, moved away, or owned by another node) → 503
  ``InternalError`` with ``Retry-After``: the user's database is unavailable *here* for a
  while, which is what 503 + ``Retry-After`` says (RFC 9110 §15.6.4).  Not 421 Misdirected
  Request: RFC 9110 lets a client retry a 421 at once on another connection, which through
  the router reaches this node again, and no chroma client does anything special with it;
  nor ``RateLimitError`` (not the user's rate, and alerts on it would mislead).  The router
  never retries either (``proxy_next_upstream off``: another node would hold no data).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from stcs import errors as e

# error class -> (HTTP status, chroma error name).  A subclass not listed answers as its
# nearest listed base; tests/unit/test_answers.py checks every RequestError is listed.
HTTP: dict[type, tuple[int, str]] = {
    e.AuthError: (401, "AuthError"),
    e.UnknownUserError: (401, "AuthError"),
    e.AuthUnavailableError: (503, "InternalError"),
    e.LookupsSaturatedError: (503, "InternalError"),
    e.InvalidUserIdError: (502, "InternalError"),
    e.UserBlockedError: (403, "AuthorizationError"),
    e.CapacityTimeoutError: (503, "RateLimitError"),
    e.NewUsersRateLimitError: (429, "RateLimitError"),
    e.LookupsPerAddressError: (429, "RateLimitError"),
    e.StartFailedError: (503, "InternalError"),
    e.DirectoryLockedError: (503, "InternalError"),
    e.StartBackoffError: (503, "InternalError"),
    e.ShuttingDownError: (503, "InternalError"),
    e.UpstreamError: (502, "InternalError"),
    e.BadRequestError: (400, "InvalidArgumentError"),
    e.BodyTooLargeError: (413, "InvalidArgumentError"),
    e.RequestTimeoutError: (408, "InvalidArgumentError"),
    e.HeadTooLargeError: (431, "InvalidArgumentError"),
    e.UnsupportedCodingError: (501, "InvalidArgumentError"),
    e.TooManyConnectionsError: (503, "RateLimitError"),
    e.QuotaExceededError: (422, "QuotaError"),
    e.MemoryLimitError: (422, "QuotaError"),
    e.UserRateLimitError: (429, "RateLimitError"),
    e.NotOwnerError: (503, "InternalError"),
    e.UserMovingError: (503, "InternalError"),
    e.AdminDisabledError: (404, "NotFoundError"),
    e.AdminForbiddenError: (403, "AuthorizationError"),
    e.BadAdminRequestError: (400, "InvalidArgumentError"),
    e.NoInstanceError: (404, "NotFoundError"),
    e.NoUserDataError: (404, "NotFoundError"),
    e.PlacementConflictError: (409, "InvalidArgumentError"),
    e.InsufficientStorageError: (507, "InternalError"),
}


@dataclass(frozen=True, slots=True)
class ErrorAnswer:
    """An error response: ``status``, chroma error ``name``, the client-safe ``message`` and
    extra ``headers`` (``Retry-After`` in seconds when the error carries one)."""

    status: int
    name: str
    message: str
    headers: tuple[tuple[str, str], ...]

    @property
    def body(self) -> bytes:
        """``{"error": NAME, "message": TEXT}`` as JSON bytes."""
        return orjson.dumps({"error": self.name, "message": self.message})


# Any other exception (a bug): logged with its traceback, never shown to the client.
UNEXPECTED = ErrorAnswer(500, "InternalError", "internal error", ())

_RESOLVED: dict[type, tuple[int, str]] = {}  # each class met so far -> its table entry


def _lookup(cls: type) -> tuple[int, str]:
    found = _RESOLVED.get(cls)
    if found is None:
        found = next((HTTP[base] for base in cls.__mro__ if base in HTTP), (500, "InternalError"))
        _RESOLVED[cls] = found
    return found


def status_of(exc: e.RequestError) -> int:
    """The HTTP status ``exc`` is answered with."""
    return _lookup(type(exc))[0]


def answer_for(exc: e.RequestError) -> ErrorAnswer:
    """The response for ``exc`` (500 ``InternalError`` for an unlisted class)."""
    status, name = _lookup(type(exc))
    headers = () if exc.retry_after_s is None else (("Retry-After", str(exc.retry_after_s)),)
    return ErrorAnswer(status, name, exc.message, headers)
