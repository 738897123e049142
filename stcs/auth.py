"""Token extraction and token -> user id resolution.

Two modes, as the Node.js single-tenant-chroma-server:

* `AuthServerResolver` (``authServerEndpoint`` set): ``GET`` the endpoint with
  ``Authorization: Bearer <token>`` and ``x-api-key: <authServerAPIKey>``; it answers
  ``{"userId": ...}`` or ``{"data": {"userId": ...}}``.  Positive answers are cached for
  ``authCacheTTL`` ms, rejections (401/403) briefly; concurrent lookups of one token share one
  call (single-flight), cancelled when its last waiter leaves; one client address has at most
  ``authMaxLookupsPerAddress`` lookups in flight.  An answer that is not a clear yes or no is
  `AuthUnavailableError` (503), never a 401 and never cached.
* `UuidResolver` (no endpoint): the token must be a UUID; the user id is its lowercase form.

Either way the user id becomes a directory name and must pass `validate_user_id`.
Tokens are never logged; the caches key on a SHA-256 digest of the token.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import json
import os
import re
import ssl
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import structlog

from stcs.errors import (
    AdminDisabledError,
    AdminForbiddenError,
    AuthError,
    AuthUnavailableError,
    InvalidUserIdError,
    LookupsPerAddressError,
    LookupsSaturatedError,
    UnknownUserError,
)
from stcs.fairness import AddressCounts, Client
from stcs.recorder import NULL_RECORDER, Recorder

log = structlog.get_logger("stcs.auth")

TOKEN_HEADER = "X-Chroma-Token"

# RFC 4122 textual form, 8-4-4-4-12 hex digits.  Version and variant nibbles are not checked,
# as the Node.js server did not: tokens that worked there keep working.
UUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")

# A user id names the directory <dbPath>/<userId>: it cannot start with a dot (no ".", "..",
# hidden files, stcs's own ".stcs"), contain a separator, or be longer than 128 characters.
USER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")

# Rejections are cached this long at most (ms), so a flood of one bad token does not become a
# flood on the auth server, while a token that just became valid is not refused for long.
REJECTION_CACHE_MS = 5000

# Visible ASCII only (RFC 9110 token68 is stricter; we only refuse what cannot be a token).
_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,4096}")


def verify_admin_key(expected: str, x_api_key: bytes | None, authorization: bytes | None) -> None:
    """Check an admin request's key: ``x-api-key: KEY``, else ``Authorization: Bearer KEY``
    (header values as received, bytes), compared in constant time (`hmac.compare_digest`).

    Raises AdminDisabledError when no ``adminAPIKey`` is configured (``expected`` empty),
    AdminForbiddenError for a missing or wrong key.
    """
    if not expected:
        raise AdminDisabledError("admin endpoints are disabled (no adminAPIKey configured)")
    given = x_api_key
    if given is None:
        scheme, _, value = (authorization or b"").strip().partition(b" ")
        given = value.strip() if scheme.lower() == b"bearer" else b""
    if not hmac.compare_digest(given, expected.encode()):
        raise AdminForbiddenError("invalid admin key")


def extract_token(headers: Mapping[str, str]) -> str:
    """Return the client's token: ``X-Chroma-Token``, else ``Authorization: Bearer <token>``.

    These are the two transports of chromadb's ``TokenAuthClientProvider``.  Raises AuthError
    for no token, an empty one, an ``Authorization`` header of another scheme, or a value with
    spaces or control characters (e.g. several tokens).
    """
    raw = headers.get(TOKEN_HEADER)
    if raw is None:
        auth = headers.get("Authorization")
        if auth is None:
            raise AuthError("no token: send X-Chroma-Token or Authorization: Bearer <token>")
        scheme, _, raw = auth.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise AuthError("Authorization header must use the Bearer scheme")
    token = raw.strip()
    if not token:
        raise AuthError("empty token")
    if not _TOKEN_RE.fullmatch(token):
        raise AuthError("malformed token")
    return token


def validate_user_id(user_id: object) -> str:
    """Return ``user_id`` if it is a safe directory name, else raise InvalidUserIdError.

    Rule: ``^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$``, matched in full (a trailing
    newline does not pass).
    """
    if not isinstance(user_id, str) or not USER_ID_RE.fullmatch(user_id):
        raise InvalidUserIdError("the auth server returned a user id unusable as a directory name")
    return user_id


def normalize_user_id(user_id: str, *, uuid_mode: bool) -> str:
    """A user id as the resolver would produce it, for the admin API and the command line.

    In UUID mode (``uuid_mode``: no ``authServerEndpoint``) a UUID in any case means its
    lowercase form, the id `UuidResolver` gives; otherwise ids are taken as they are (an auth
    server's ids are case-sensitive).  Raises InvalidUserIdError (`validate_user_id`).
    """
    if uuid_mode and UUID_RE.fullmatch(user_id):
        return user_id.lower()
    return validate_user_id(user_id)


class Resolver(Protocol):
    """Resolves a token to a user id.  Raises AuthError or AuthUnavailableError.  ``client``
    (the request's client, for per-address limits) is optional."""

    async def resolve(self, token: str, client: Client | None = None) -> str: ...


class UuidResolver:
    """No auth server: the token itself is the user's UUID (pre-validated by the application)."""

    async def resolve(self, token: str, client: Client | None = None) -> str:
        """Return the lowercase UUID; raise AuthError if ``token`` is not a UUID."""
        if not UUID_RE.fullmatch(token):
            raise AuthError("invalid token: expected a UUID")
        return token.lower()

    def peek(self, token: str, *, count: bool = True) -> str | None:
        """`resolve`'s answer when it needs no wait and raises nothing, else None."""
        return token.lower() if UUID_RE.fullmatch(token) else None


class ExistingUsersResolver:
    """``autoCreateUsers: false``: resolve with ``inner``, then refuse (AuthError, 401) a user
    whose directory ``<db_dir>/<userId>`` does not exist — before anything is created, so
    random UUIDs cannot fill the disk.  Users are added with ``stcs users add`` or
    ``PUT /admin/users/{userId}`` (`create_user`).

    One stat per request (~1 µs), not a cache: a user removed by an operator (hold, delete
    the directory, release) is refused from the next request on.

    In a cluster (docs/scale-out.md) a user's directory is on one node only, and
    ``check_owner(userId)`` (`stcs.placement.Placement.check_owner`) raises NotOwnerError for a
    user the ring places on another node: such a user, absent here, is refused as misrouted
    (503 + ``Retry-After``: the router or a move will bring them to their node), not as
    unknown; and `resolve_anywhere` (``GET /auth``, which the router asks of any node)
    does not look for the directory at all — the node the ring gives the user to does.
    """

    def __init__(
        self,
        inner: Resolver,
        db_dir: Path,
        check_owner: Callable[[str], None] | None = None,
        in_cluster: Callable[[], bool] | None = None,
    ) -> None:
        self._inner = inner
        self._db_dir = str(db_dir)
        self._check_owner = check_owner
        self._in_cluster = in_cluster

    async def resolve(self, token: str, client: Client | None = None) -> str:
        """The user id of ``token`` if that user exists here.  Raises what ``inner`` raises,
        NotOwnerError for a user absent here whom the ring places on another node, and
        UnknownUserError (AuthError) for a user with no directory."""
        user_id = validate_user_id(await self._inner.resolve(token, client))  # a name before a stat
        # One stat of a local directory (~1 µs): cheaper inline than any hand-off to a thread.
        if not os.path.isdir(os.path.join(self._db_dir, user_id)):  # noqa: ASYNC240
            if self._check_owner is not None:
                self._check_owner(user_id)
            log.debug("unknown user refused", user_id=user_id)
            raise UnknownUserError("unknown user")
        return user_id

    def peek(self, token: str, *, count: bool = True) -> str | None:
        """`resolve`'s answer when it needs no wait and raises nothing (the inner resolver
        knows the token at once, the directory exists), else None."""
        peek: Callable[..., str | None] | None = getattr(self._inner, "peek", None)
        if peek is None:
            return None
        user_id = peek(token, count=False)
        if (
            user_id is None
            or not USER_ID_RE.fullmatch(user_id)  # a name before a stat, as in `resolve`
            or not os.path.isdir(os.path.join(self._db_dir, user_id))
        ):
            return None
        return peek(token, count=count) if count else user_id

    async def resolve_anywhere(self, token: str, client: Client | None = None) -> str:
        """For ``GET /auth``: in a cluster, the user id of ``token`` wherever the user lives
        (no directory check); on a single node, `resolve`."""
        if self._in_cluster is not None and self._in_cluster():
            return validate_user_id(await self._inner.resolve(token, client))
        return await self.resolve(token, client)


def create_user(db_dir: Path, user_id: str) -> bool:
    """Create ``<db_dir>/<user_id>`` (mode 0700, ``db_dir`` too if missing); False when it
    already exists.  ``user_id`` must be normalised (`normalize_user_id`).  Raises OSError."""
    db_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        (db_dir / validate_user_id(user_id)).mkdir(mode=0o700)
    except FileExistsError:
        return False
    return True


def tls_context(ca_file: str) -> ssl.SSLContext:
    """The TLS context for the auth server: certificates verified, against ``ca_file`` (PEM)
    if given, else the system's CAs.  Raises OSError or ssl.SSLError for an unusable file."""
    return ssl.create_default_context(cafile=ca_file or None)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class _Lookup:
    """One token's lookup in flight: its task, how many requests wait for it, and the client
    address it is counted against (the address of the request that began it)."""

    __slots__ = ("address", "task", "waiters")

    def __init__(self, task: asyncio.Task[str], address: str | None) -> None:
        self.task = task
        self.address = address
        self.waiters = 0


class AuthServerResolver:
    """Resolve tokens through an HTTP auth server, with a cache and single-flight lookups.

    ``cache_ttl_ms`` 0 disables the positive cache.  ``timeout_ms`` bounds one lookup, the
    wait for a lookup slot included.  At most ``max_concurrent`` lookups are in flight
    (``authMaxConcurrentLookups``): a slow auth server costs a bounded number of sockets, and
    beyond it lookups wait; cache hits never do.  A lookup is cancelled (its slot freed) when
    the last request waiting for it leaves (its client closed the connection).  One client
    address may have begun at most ``max_per_address`` of the lookups in flight
    (``authMaxLookupsPerAddress``, 0: no bound): beyond, LookupsPerAddressError (429) at once —
    refused rather than queued, so a flood from one address costs neither a queue nor a wait
    and tells a well-behaved client to retry in 1 s.  Each resolution's result ("ok" |
    "rejected" | "error" | "saturated" | "cache_hit" | "abandoned" | "per_address") goes to
    ``recorder`` (`stcs.recorder.Recorder.auth_lookup`).
    """

    MAX_CACHE_ENTRIES = 100_000

    def __init__(
        self,
        session: aiohttp.ClientSession,
        endpoint: str,
        api_key: str = "",
        cache_ttl_ms: int = 60000,
        timeout_ms: int = 5000,
        recorder: Recorder = NULL_RECORDER,
        max_concurrent: int = 32,
        health: AuthServerHealth | None = None,
        max_per_address: int = 0,
    ) -> None:
        self._session = session
        self.health = health or AuthServerHealth(endpoint)
        self._recorder = recorder
        self._endpoint = endpoint
        self._api_key = api_key
        self._cache_ttl = cache_ttl_ms / 1000
        self._reject_ttl = min(cache_ttl_ms, REJECTION_CACHE_MS) / 1000
        self._timeout_s = timeout_ms / 1000
        self._slots = asyncio.Semaphore(max_concurrent)
        # digest -> (user id or None for rejected, expiry on the monotonic clock)
        self._cache: dict[bytes, tuple[str | None, float]] = {}
        self._inflight: dict[bytes, _Lookup] = {}
        self._max_per_address = max_per_address
        self._by_address = AddressCounts()  # lookups in flight per client address

    async def resolve(self, token: str, client: Client | None = None) -> str:
        """Return the user id for ``token``.

        Raises AuthError (401/403 from the auth server), AuthUnavailableError (no usable
        answer), InvalidUserIdError (an answer unusable as a directory name) or
        LookupsPerAddressError (``client``'s address has its share of lookups in flight).
        """
        key = _digest(token)
        hit = self._cache.get(key)
        if hit is not None:
            user_id, expires = hit
            if time.monotonic() < expires:
                self._count("cache_hit")
                if user_id is None:
                    raise AuthError("invalid token")
                return user_id
            del self._cache[key]
        lookup = self._inflight.get(key)
        if lookup is None:
            lookup = self._begin(token, key, client)
        # The lookup runs as its own task, shared: a caller that disconnects (is cancelled)
        # leaves it to the others, and the last one to leave cancels it.
        lookup.waiters += 1
        try:
            return await asyncio.shield(lookup.task)
        finally:
            lookup.waiters -= 1
            if not lookup.waiters and not lookup.task.done():
                if self._inflight.get(key) is lookup:
                    del self._inflight[key]
                lookup.task.cancel()
                self._count("abandoned")

    def peek(self, token: str, *, count: bool = True) -> str | None:
        """`resolve`'s answer when the cache has it (a user id, not expired; counted as a
        ``cache_hit`` when ``count``), else None: no lookup begins."""
        hit = self._cache.get(_digest(token))
        if hit is None or hit[0] is None or time.monotonic() >= hit[1]:
            return None
        if count:
            self._count("cache_hit")
        return hit[0]

    def _begin(self, token: str, key: bytes, client: Client | None) -> _Lookup:
        """Start ``token``'s lookup, counted against ``client``'s address.  Raises
        LookupsPerAddressError when that address has its share in flight."""
        address = client.address if client is not None else None
        if self._max_per_address and self._by_address.get(address) >= self._max_per_address:
            self._count("per_address")
            raise LookupsPerAddressError(
                "too many token lookups in flight from this address; retry later",
                retry_after_s=1,
            )
        lookup = _Lookup(asyncio.ensure_future(self._counted_lookup(token, key)), address)
        self._inflight[key] = lookup
        self._by_address.add(address)

        def finished(task: asyncio.Task[str]) -> None:
            self._by_address.remove(address)
            if self._inflight.get(key) is lookup:
                del self._inflight[key]
            if not task.cancelled():
                task.exception()  # retrieved: the waiters (if any) re-raise it

        lookup.task.add_done_callback(finished)
        return lookup

    def _count(self, result: str) -> None:
        self._recorder.auth_lookup(result)

    async def _counted_lookup(self, token: str, key: bytes) -> str:
        try:
            user_id = await self._lookup(token, key)
        except AuthError:
            self._count("rejected")
            raise
        except LookupsSaturatedError:
            self._count("saturated")
            raise
        except (AuthUnavailableError, InvalidUserIdError):
            self._count("error")
            raise
        self._count("ok")
        return user_id

    def _remember(self, key: bytes, user_id: str | None, ttl: float) -> None:
        if ttl <= 0:
            return
        if len(self._cache) >= self.MAX_CACHE_ENTRIES:
            now = time.monotonic()
            for k in [k for k, (_, exp) in self._cache.items() if exp <= now]:
                del self._cache[k]
            if len(self._cache) >= self.MAX_CACHE_ENTRIES:
                self._cache.clear()
        self._cache[key] = (user_id, time.monotonic() + ttl)

    async def _lookup(self, token: str, key: bytes) -> str:
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._slots.acquire(), self._timeout_s)
        except asyncio.TimeoutError:
            log.warning("auth lookups saturated", timeout_ms=int(self._timeout_s * 1000))
            raise LookupsSaturatedError("too many auth server lookups in flight") from None
        try:
            remaining = max(0.001, self._timeout_s - (time.monotonic() - started))
            async with self._session.get(
                self._endpoint,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=remaining),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                body = await resp.read() if status == 200 else b""
        except asyncio.TimeoutError:
            self.health.record(0)
            log.warning("auth server timed out", timeout_ms=int(self._timeout_s * 1000))
            raise AuthUnavailableError("auth server timed out") from None
        except aiohttp.ClientError as exc:
            self.health.record(0)
            log.warning("auth server unreachable", error=type(exc).__name__)
            raise AuthUnavailableError("auth server unreachable") from None
        finally:
            self._slots.release()
        self.health.record(status)
        duration_ms = round((time.monotonic() - started) * 1000, 1)
        if status in (401, 403):
            # debug: one line per distinct bad token would let a client write lines at the
            # auth server's pace; the request's own line (401) is within its address's budget.
            log.debug("token rejected", auth_status=status, duration_ms=duration_ms)
            self._remember(key, None, self._reject_ttl)
            raise AuthError("invalid token")
        if status != 200:
            log.warning("auth server error", auth_status=status, duration_ms=duration_ms)
            raise AuthUnavailableError(f"auth server answered {status}")
        user_id = _user_id_from(body)
        validate_user_id(user_id)
        log.debug("token resolved", user_id=user_id, duration_ms=duration_ms)
        self._remember(key, user_id, self._cache_ttl)
        return user_id


def _user_id_from(body: bytes) -> str:
    """Extract ``data.userId`` or ``userId`` from an auth server's JSON answer.

    Raises AuthUnavailableError when the body is not JSON or has no string user id.
    """
    try:
        doc: Any = json.loads(body)
    except ValueError:
        raise AuthUnavailableError("auth server answer is not JSON") from None
    candidates = []
    if isinstance(doc, dict):
        data = doc.get("data")
        if isinstance(data, dict) and "userId" in data:
            candidates.append(data["userId"])
        if "userId" in doc:
            candidates.append(doc["userId"])
    for user_id in candidates:
        if isinstance(user_id, str) and user_id:
            return user_id
    raise AuthUnavailableError("auth server answer has no string userId")


class AuthServerHealth:
    """What the auth server's recent answers say, for ``/admin-health`` and one warning.

    A wrong ``authServerAPIKey`` looks like every user's token being bad: the auth server
    refuses every lookup, and each refusal alone is an ordinary ``token rejected``.  So the last
    `WINDOW` lookups' outcomes are kept (HTTP status; 0 when there was no answer), and when at
    least `SUSPECT_MIN` of them are there, none was accepted and at least `SUSPECT_SHARE` were
    refused with one status, the key is suspect: a warning naming ``authServerAPIKey``, at most
    once per `WARN_EVERY_S` seconds.  ``clock`` is wall-clock seconds (`time.time`).
    """

    WINDOW = 50
    SUSPECT_MIN = 20
    SUSPECT_SHARE = 0.9
    WARN_EVERY_S = 60.0

    def __init__(self, endpoint: str, clock: Callable[[], float] = time.time) -> None:
        self.endpoint = endpoint
        self._clock = clock
        self._recent: deque[int] = deque(maxlen=self.WINDOW)
        self._last_ok: float | None = None
        self._last_warned: float | None = None

    def record(self, status: int) -> None:
        """Count one lookup's outcome: the auth server's HTTP status, 0 for no answer."""
        self._recent.append(status)
        now = self._clock()
        if status == 200:
            self._last_ok = now
            return
        refused = self.suspect_status()
        if refused is not None and (
            self._last_warned is None or now - self._last_warned >= self.WARN_EVERY_S
        ):
            self._last_warned = now
            log.warning(
                "auth server refuses almost every token: check authServerAPIKey",
                auth_status=refused,
                refused=self._recent.count(refused),
                lookups=len(self._recent),
            )

    def suspect_status(self) -> int | None:
        """The status (401 or 403) nearly every recent lookup was refused with while none was
        accepted, or None."""
        if len(self._recent) < self.SUSPECT_MIN or 200 in self._recent:
            return None
        for status in (401, 403):
            if self._recent.count(status) >= self.SUSPECT_SHARE * len(self._recent):
                return status
        return None

    def view(self) -> dict[str, Any]:
        """JSON for ``/admin-health``: ``{"endpoint", "lookups", "accepted", "refused",
        "errors", "lastAcceptedAt" (ISO 8601 UTC or null), "suspectApiKey"}`` over the last
        `WINDOW` lookups; ``errors`` counts timeouts, unreachable and other statuses."""
        recent = list(self._recent)
        accepted = recent.count(200)
        refused = recent.count(401) + recent.count(403)
        last_ok = (
            None
            if self._last_ok is None
            else datetime.datetime.fromtimestamp(self._last_ok, datetime.timezone.utc)
            .isoformat(timespec="seconds")
            .replace("+00:00", "Z")
        )
        return {
            "endpoint": self.endpoint,
            "lookups": len(recent),
            "accepted": accepted,
            "refused": refused,
            "errors": len(recent) - accepted - refused,
            "lastAcceptedAt": last_ok,
            "suspectApiKey": self.suspect_status() is not None,
        }


class Blocklist:
    """Users refused with 403 ``AuthorizationError`` whatever their token, persisted as a JSON
    list in ``path`` (``<dbPath>/.stcs/blocked.json``) so a block survives restarts."""

    def __init__(self, path: Path) -> None:
        self._path = path
        try:
            self._users: set[str] = set(json.loads(path.read_text()))
        except FileNotFoundError:
            self._users = set()

    def __contains__(self, user_id: str) -> bool:
        return user_id in self._users

    @property
    def users(self) -> list[str]:
        return sorted(self._users)

    def set(self, user_id: str, blocked: bool) -> None:
        """Block or unblock ``user_id`` and save (atomically: write, then rename)."""
        (self._users.add if blocked else self._users.discard)(user_id)
        tmp = self._path.with_suffix(".tmp")
        # 0600 whatever the umask: in UUID mode the list names tokens.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(self.users))
        tmp.replace(self._path)
