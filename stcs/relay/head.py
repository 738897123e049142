"""A request as parsed (`Request`) and the checks decided by its head alone (pure functions)."""

from __future__ import annotations

import asyncio
import collections
import re

from stcs.errors import (
    BadRequestError,
    BodyTooLargeError,
    HeadTooLargeError,
    RequestError,
    UnsupportedCodingError,
)
from stcs.relay.limits import Limits

# The header fields read by name (lowercase); the others pass through as bytes, unread.
SPECIAL = frozenset(
    (
        b"x-chroma-token",
        b"authorization",
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"upgrade",
        b"x-api-key",
    )
)


# `POST /admin/users/{userId}/import` (stcs.admin): a user's whole database, bounded by the
# node's free disk space (stcs.transfer.check_free), not by maxBodySize.  The admin key is
# checked before any of its body is read (`Handler._control`).
IMPORT_PATH = re.compile(rb"/admin/users/[^/?]+/import")
IMPORT_BODY_LIMIT = 1 << 62


def body_limit(request: Request, limits: Limits) -> int:
    """The most body bytes ``request`` may send: ``maxBodySize``, or `IMPORT_BODY_LIMIT` for an
    admin import."""
    path = request.path
    if (
        path.startswith(b"/admin/users/")
        and request.method == b"POST"
        and IMPORT_PATH.fullmatch(path)
    ):
        return IMPORT_BODY_LIMIT
    return limits.max_body_size


class Request:
    """One request as parsed: head, then body pieces as they arrive (`ClientConnection`'s
    httptools callbacks fill it; the request's `RequestCycle` consumes the body)."""

    __slots__ = (
        "body",
        "body_error",
        "body_limit",
        "buffered",
        "chunked",
        "complete",
        "content_length",
        "expect_continue",
        "forwarded",
        "headers",
        "keep_alive",
        "method",
        "received",
        "reject",
        "special",
        "url",
        "version",
        "waiter",
    )

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.special: dict[bytes, bytes] = {}  # lowercase name -> value, for `SPECIAL` ones
        self.forwarded: list[bytes] = []  # X-Forwarded-For values
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.reject: RequestError | None = None  # refused by its head: answered, then close
        self.body: collections.deque[bytes | bytearray] = collections.deque()
        self.buffered = 0  # body bytes received and not consumed yet
        self.received = 0  # body bytes received in all
        self.body_limit = 0  # the most body bytes accepted (`body_limit`), set with the head
        self.complete = False
        self.body_error: RequestError | None = None  # the body failed (size, timeout, framing)
        # The cycle waiting for body bytes (or the body's end, or an error): resolved by `wake`.
        self.waiter: asyncio.Future[bool] | None = None

    def wake(self) -> None:
        """Resume the cycle waiting in `RequestCycle._more_body`, if one is (body bytes, the
        body's end, an error or the client's leaving arrived)."""
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(True)

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def path(self) -> bytes:
        """The target without its query."""
        return self.url.partition(b"?")[0]


def duplicate_field(request: Request, lower: bytes, name: bytes) -> RequestError | None:
    """A second ``Content-Length`` is llhttp's to refuse; a second token, ``Expect``, … is
    ambiguous and refused here (400)."""
    if lower in request.special and lower != b"content-length":
        return BadRequestError(f"duplicate {name.decode('latin-1')} header")
    return None


def framing(special: dict[bytes, bytes], version: str) -> tuple[int | None, bool, bool]:
    """(Content-Length, chunked, expects ``100 Continue``) as the head announces them
    (RFC 9112 §6; llhttp accepted the Content-Length, so it is digits only)."""
    cl = special.get(b"content-length")
    expect = special.get(b"expect")
    return (
        None if cl is None else int(cl),
        b"transfer-encoding" in special,
        expect is not None and expect.strip().lower() == b"100-continue" and version == "1.1",
    )


def check_head(request: Request, limits: Limits) -> RequestError | None:
    """The refusal decided by the head alone, or None (answered in order, then the connection
    closes).  Reads ``request`` (its framing set by `framing`, its ``body_limit`` by
    `body_limit`); changes nothing."""
    # The head as sent, give or take optional whitespace: request line and header lines.
    size = (
        len(request.method)
        + len(request.url)
        + 12
        + sum(len(k) + len(v) + 4 for k, v in request.headers)
    )
    if size > limits.max_header_size:
        return HeadTooLargeError(f"request head over the limit of {limits.max_header_size} bytes")
    if request.version not in ("1.0", "1.1"):
        return BadRequestError(f"HTTP/{request.version} is not supported")
    if len(request.headers) > limits.max_headers_count:
        return HeadTooLargeError(f"more than {limits.max_headers_count} header lines")
    if request.method == b"CONNECT" or b"upgrade" in request.special:
        return BadRequestError(f"{request.method.decode()} / Upgrade is not supported")
    if not request.url.startswith(b"/"):
        return BadRequestError("request target must be a path (origin-form)")
    # Of these three, the last that applies wins (as it always has): Expect, size, coding.
    expect = request.special.get(b"expect")
    if expect is not None and expect.strip().lower() != b"100-continue":
        return BadRequestError("unsupported Expect")  # RFC 9110 §10.1.1: 417
    length = request.content_length
    limit = request.body_limit  # `body_limit`, set with the head
    if length is not None and length > limit:
        return BodyTooLargeError(
            f"request body of {length} bytes exceeds the limit of {limit} bytes"
        )
    te = request.special.get(b"transfer-encoding")
    if te is not None and te.strip().lower() != b"chunked":
        return UnsupportedCodingError("only the chunked transfer coding is supported")
    return None
