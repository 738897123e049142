"""What stcs knows of chroma's HTTP API: its routes, and the few calls stcs makes itself.

The one module that names chroma's paths: the heartbeat (readiness, liveness,
``/admin-health``: `heartbeat`), which requests can store data (`classify`, for the quotas)
and the collection routes a quota counts with (`record_count`, `existing_count`).  The calls go
through the one client stcs has to its children, `stcs.upstream.UpstreamPool` (`fetch`), on
the child incarnation itself (a `stcs.upstream.Target`), never on a bare port.

Routes are chroma 1.5's v2 API (its ``/openapi.json``, ``chroma run`` 1.5.9).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson

from stcs.upstream import Target, UnreachableError, UpstreamFailedError, UpstreamPool

HEARTBEAT_PATH = "/api/v2/heartbeat"  # chroma's liveness endpoint (API v2)
# A quota's count or existence check: in all, and to connect (an aiohttp ClientTimeout before).
COUNT_TIMEOUT_S = 5.0
COUNT_CONNECT_TIMEOUT_S = 1.0

# The routes, as quotas see them:
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
NEW_COLLECTION = frozenset(("create", "fork"))
NEW_RECORDS = frozenset(("add", "upsert"))


def classify(method: str, path: str) -> tuple[str | None, re.Match[str] | None]:
    """Which chroma operation ``method path`` is, as far as quotas care (the table above).

    Returns ``(kind, match)``: kind is "create" | "add" | "upsert" | "fork" | "write" (writes,
    refused over ``userMaxDiskMB``), "delete" (frees space: the size is measured again after it)
    or None (reads).  ``match`` is the collections route's match (groups: tenant, database,
    collection, action), when it is one.  ``path`` may carry a query string.
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


def collection_path(match: re.Match[str]) -> str:
    """``/api/v2/tenants/{t}/databases/{d}/collections/{id}`` of a `classify` match (its
    segments as the client sent them)."""
    tenant, database, collection = match.group(1), match.group(2), match.group(3)
    return f"/api/v2/tenants/{tenant}/databases/{database}/collections/{collection}"


_FAILED = (UnreachableError, UpstreamFailedError, asyncio.TimeoutError, OSError)


async def heartbeat(pool: UpstreamPool, child: Target, timeout_s: float) -> bool:
    """Whether ``child`` answers chroma's heartbeat (``GET /api/v2/heartbeat`` → 200) within
    ``timeout_s`` seconds.  Never raises."""
    try:
        status, _body = await pool.fetch(child, "GET", HEARTBEAT_PATH, timeout_s=timeout_s)
    except _FAILED:
        return False
    return status == 200


async def _json(
    pool: UpstreamPool, child: Target, method: str, path: str, body: bytes | None = None
) -> Any:
    """chroma's JSON answer to ``method path`` if it is a 200, else None (never raises)."""
    try:
        status, answer = await pool.fetch(
            child,
            method,
            path,
            body,
            timeout_s=COUNT_TIMEOUT_S,
            connect_timeout_s=COUNT_CONNECT_TIMEOUT_S,
        )
        return orjson.loads(answer) if status == 200 else None
    except (*_FAILED, orjson.JSONDecodeError):
        return None


async def record_count(pool: UpstreamPool, child: Target, match: re.Match[str]) -> int | None:
    """Records in the collection of ``match`` (chroma's ``GET .../collections/{id}/count``, a
    JSON integer); None when chroma gives no count (e.g. 404: chroma answers the request)."""
    value = await _json(pool, child, "GET", f"{collection_path(match)}/count")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def existing_count(
    pool: UpstreamPool, child: Target, match: re.Match[str], ids: list[Any]
) -> int:
    """How many of ``ids`` the collection of ``match`` already holds (chroma's ``POST
    .../get`` with ``include: []``); 0 when chroma cannot say."""
    body = orjson.dumps({"ids": ids, "include": []})
    found = await _json(pool, child, "POST", f"{collection_path(match)}/get", body)
    got = found.get("ids") if isinstance(found, dict) else None
    return len(got) if isinstance(got, list) else 0
