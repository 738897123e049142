"""Admin endpoints, all behind ``adminAPIKey`` (``x-api-key: KEY`` or ``Authorization: Bearer
KEY``; 404 while no key is configured, 403 on a wrong one):

* ``GET /admin-health`` — the Node.js server's JSON (instances, memory summary).
* ``GET /metrics`` — Prometheus text format.
* ``GET /admin/instances`` — running instances.
* ``DELETE /admin/instances/{userId}[?drainTimeout=S]`` — stop one user's instance once its
  requests in flight are done (new ones for that user wait meanwhile); 404 if none runs.
* ``PUT /admin/users/{userId}`` — create a user's directory (``autoCreateUsers: false``).
* ``POST|DELETE /admin/users/{userId}/block`` — refuse (403) or allow a user again.
* ``GET|PUT /admin/users/{userId}/limits`` — a user's effective limits, overrides and usage;
  ``PUT`` replaces the user's overrides (`stcs.quotas`, kept in ``<dbPath>/.stcs/limits.json``).
* ``GET /admin/users`` — every user with a directory on this node's disk, its size and its
  cluster placement mark.
* ``GET /admin/cluster`` — this node's ring (``clusterNodes``, ``clusterSelf``) and the users
  marked arriving or moved away (`stcs.placement`).
* ``PUT /admin/users/{userId}/placement`` — mark a user ``arriving``, ``moved`` (``"to"``:
  the node) or ``home`` (clears the mark); the user's instance is stopped first.
* ``PUT /admin/cluster`` — set this node's node list at run time (a rebalance's switch).
* ``GET /admin/users/{userId}/manifest``, ``POST …/export``, ``POST …/import``, ``POST
  …/prune``, ``DELETE …/data`` — copy a user's files between nodes (`stcs.transfer`): import
  and prune only into a user marked ``arriving`` here, data removal only of one marked
  ``moved``.
* ``POST /admin/users/{userId}/hold[?ttl=S&drainTimeout=S]`` — hold a user for maintenance
  (backup, restore): the instance stops after its requests in flight, new requests wait; the hold
  ends with ``DELETE`` or after ``ttl`` seconds (default 600).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import psutil
import structlog
from aiohttp import web

from stcs import transfer
from stcs.auth import USER_ID_RE, create_user, normalize_user_id, verify_admin_key
from stcs.datadir import tree_bytes, user_dir_locked
from stcs.errors import (
    BadAdminRequestError,
    InvalidUserIdError,
    NoInstanceError,
    NotOwnerError,
    NoUserDataError,
    PlacementConflictError,
)
from stcs.layout import Layout
from stcs.memory import system_memory, tree_pss
from stcs.metrics import CONTENT_TYPE
from stcs.placement import ARRIVING, HOME, MOVED, STATES, Placement
from stcs.quotas import Quotas, check_overrides
from stcs.snapshot import InstanceView, Phase
from stcs.state import STATE, State

log = structlog.get_logger("stcs.admin")

DEFAULT_HOLD_TTL_S = 600.0
DEFAULT_DRAIN_TIMEOUT_S = 300.0
ADMIN_PROBE_TIMEOUT_S = 2.0  # /admin-health's heartbeat of each ready instance


def check_admin_key(request: web.Request) -> None:
    """Raise AdminDisabledError (no ``adminAPIKey``) or AdminForbiddenError (wrong key);
    `auth.verify_admin_key` (the relay checks it the same way before it reads a body)."""
    headers = request.headers
    x_api_key = headers.get("x-api-key")
    authorization = headers.get("Authorization")
    # aiohttp keeps a header's non-UTF-8 bytes as surrogates: this gives back the bytes received.
    verify_admin_key(
        request.app[STATE].settings.admin_api_key,
        None if x_api_key is None else x_api_key.encode("utf-8", "surrogateescape"),
        None if authorization is None else authorization.encode("utf-8", "surrogateescape"),
    )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")


async def _mem_kb(views: Sequence[InstanceView]) -> dict[int, int | None]:
    """pid -> the PSS of the instance's process tree in kB (1000 bytes, as the Node.js server;
    None if gone): what the tenant costs, the figure ``userMaxMemoryMB`` limits (`stcs.memory`;
    RSS would count the chroma library every child shares once per child).  Read in a thread:
    the kernel walks each process's page tables (~0.3 ms for an idle child)."""
    pss = await asyncio.to_thread(tree_pss, [v.pid for v in views if v.pid is not None])
    return {pid: None if b is None else round(b / 1000) for pid, b in pss.items()}


def instance_entry(view: InstanceView, mem_kb: Mapping[int, int | None]) -> dict[str, Any]:
    """One instance as the admin endpoints show it (``mem_kb``: `_mem_kb`)."""
    return {
        "userId": view.user_id,
        "port": view.port,
        "pid": view.pid,
        "memKb": mem_kb.get(view.pid) if view.pid is not None else None,
        "startedAt": _iso(view.started_at) if view.started_at is not None else None,
        "lastActive": _iso(view.last_active),
        "idleForMs": round(view.idle_for_s * 1000),
        "ready": view.phase is Phase.READY,
        "requests": view.requests,
        "inFlight": view.in_flight,
        "status": view.phase.value,
        "logFile": str(view.log_path) if view.log_path is not None else None,
    }


def _state(request: web.Request) -> State:
    check_admin_key(request)
    return request.app[STATE]


def _user_id(request: web.Request) -> str:
    """The ``{user_id}`` of an admin path, normalised as the resolver does (in UUID mode a UUID
    in upper case means its lowercase form).  Raises BadAdminRequestError."""
    uuid_mode = request.app[STATE].settings.user_ids_are_secret
    try:
        return normalize_user_id(request.match_info["user_id"], uuid_mode=uuid_mode)
    except InvalidUserIdError:
        raise BadAdminRequestError("not a valid user id") from None


def _seconds(request: web.Request, name: str, default: float) -> float:
    try:
        value = float(request.query.get(name, default))
    except ValueError:
        raise BadAdminRequestError(f"{name} must be a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise BadAdminRequestError(f"{name} must be a number of seconds")
    return value


async def admin_health(request: web.Request) -> web.Response:
    """``GET /admin-health``: the Node.js server's JSON, instances and memory summary.

    Shape: ``{"status": "ok", "instances": [{userId, port, pid, memKb, startedAt, lastActive,
    ready, requests, inFlight, status[, message], idleForMs, logFile}], "memory": {kbTotal,
    kbAvailable, kbAppUse, kbInstanceUse, kbInstanceAverage, kbUsedTotal, kbPercUsed,
    nMaxInstancesEstimate}, "queueLength": n, "maxInstances": n, "authServer": null in UUID
    mode, else `AuthServerHealth.view`, "childPorts": {size, held, lent, foreign}}``.  Memory in
    kB of 1000 bytes (as the Node.js server); times ISO 8601 UTC.  ``status`` is ``healthy`` when
    the instance answered its heartbeat.  ``memKb`` (and so ``kbInstanceUse``,
    ``kbInstanceAverage``) is the PSS of each instance's process tree (`_mem_kb`); ``kbTotal``
    and ``kbAvailable`` are bounded by stcs's cgroup memory limit when it has one
    (`stcs.memory.ContainerMemory`), as ``dbMinFreeMemoryMB`` is.  ``childPorts``:
    `ports.PortCounts` (``foreign``: ports of childPortRange another process holds).
    """
    state = _state(request)
    supervisor = state.supervisor
    snapshot = supervisor.snapshot()
    mem_kb = await _mem_kb(snapshot.instances)

    async def describe(view: InstanceView) -> dict[str, Any]:
        entry = instance_entry(view, mem_kb)
        if entry["ready"] and view.pid is not None:
            healthy = await supervisor.probe(view.user_id, view.pid, ADMIN_PROBE_TIMEOUT_S)
            if healthy is not None:  # None: it stopped meanwhile; its phase says so
                entry["status"] = "healthy" if healthy else "error"
                if not healthy:
                    entry["message"] = "heartbeat failed"
        return entry

    instances = await asyncio.gather(*(describe(v) for v in snapshot.instances))
    vm = psutil.virtual_memory()
    container = system_memory()
    limit = container.limit()
    kb_total = round(vm.total / 1000 if limit is None else min(vm.total, limit) / 1000)
    kb_instances = sum(i["memKb"] or 0 for i in instances)
    counted = sum(1 for i in instances if i["memKb"])
    average = round(kb_instances / counted) if counted else None
    kb_app = round(psutil.Process(os.getpid()).memory_info().rss / 1000)
    kb_available = round(container.available() / 1000)
    kb_floor = snapshot.min_free_bytes / 1000
    memory = {
        "kbTotal": kb_total,
        "kbAvailable": kb_available,
        "kbAppUse": kb_app,
        "kbInstanceUse": kb_instances,
        "kbInstanceAverage": average,
        "kbUsedTotal": kb_app + kb_instances,
        "kbPercUsed": round((kb_app + kb_instances) / kb_total, 2),
        "nMaxInstancesEstimate": (
            min(
                snapshot.max_instances,
                max(0, math.floor((kb_available - kb_floor) / average)) + len(instances),
            )
            if average
            else None
        ),
    }
    return web.json_response(
        {
            "status": "ok",
            "instances": instances,
            "memory": memory,
            "queueLength": snapshot.queue_length,
            "maxInstances": snapshot.max_instances,
            "authServer": None if state.auth_server is None else state.auth_server.view(),
            "childPorts": state.ports.counts().as_json() if state.ports else None,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text exposition format."""
    state = _state(request)
    return web.Response(body=state.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def list_instances(request: web.Request) -> web.Response:
    """``GET /admin/instances``: ``{"instances": [...], "held": [...], "blocked": [...],
    "limitOverrides": {userId: {key: value}}}``; each instance also carries ``usage``
    (``diskBytes``, ``inFlight``) next to its effective ``limits`` (YAML key -> value, 0 off).
    """
    state = _state(request)
    quotas = state.quotas
    snapshot = state.supervisor.snapshot()
    mem_kb = await _mem_kb(snapshot.instances)
    instances = []
    for view in snapshot.instances:
        entry = instance_entry(view, mem_kb)
        entry["usage"] = quotas.usage(view.user_id)
        entry["limits"] = quotas.limits_for(view.user_id).as_keys()
        instances.append(entry)
    return web.json_response(
        {
            "instances": instances,
            "held": list(snapshot.held),
            "blocked": state.blocklist.users,
            "limitOverrides": quotas.overrides.users,
        }
    )


def _limits_doc(quotas: Quotas, user_id: str) -> dict[str, Any]:
    return {
        "userId": user_id,
        "limits": quotas.limits_for(user_id).as_keys(),
        "overrides": quotas.overrides.users.get(user_id, {}),
        "usage": quotas.usage(user_id),
    }


async def user_limits(request: web.Request) -> web.Response:
    """``GET|PUT /admin/users/{userId}/limits``.

    ``GET``: ``{"userId", "limits": {key: value}, "overrides": {key: value}, "usage":
    {"diskBytes": bytes | null, "inFlight": n}}`` (keys: the settings' YAML names, e.g.
    ``userMaxDiskMB``; 0 is off).  ``PUT`` with a JSON object ``{key: int >= 0 | null}``
    replaces the user's overrides (null or a missing key: the setting applies; ``{}`` clears
    them), saves them and answers as ``GET``.  400 ``InvalidArgumentError`` for an unknown key
    or a bad value.
    """
    state = _state(request)
    quotas = state.quotas
    user_id = _user_id(request)
    if request.method == "PUT":
        try:
            checked = check_overrides(await request.json())
        except ValueError as exc:  # json.JSONDecodeError is one too
            raise BadAdminRequestError(str(exc)) from None
        except RecursionError:  # nested deeper than the JSON parser goes
            raise BadAdminRequestError("limits document nested too deep") from None
        overrides = {k: v for k, v in checked.items() if v is not None}
        quotas.set_overrides(user_id, overrides)
        log.info("user limits set", user_id=user_id, overrides=overrides)
    return web.json_response(_limits_doc(quotas, user_id))


async def stop_instance(request: web.Request) -> web.Response:
    """``DELETE /admin/instances/{userId}``: stop it after its requests in flight."""
    state = _state(request)
    user_id = _user_id(request)
    drain = _seconds(request, "drainTimeout", DEFAULT_DRAIN_TIMEOUT_S)
    if not state.supervisor.has_instance(user_id):
        raise NoInstanceError(f"no instance is running for {user_id}")
    try:
        stopped = await state.supervisor.stop_instance(user_id, drain)
    except TimeoutError as exc:
        raise BadAdminRequestError(str(exc)) from None
    log.info("admin stopped instance", user_id=user_id, stopped=stopped)
    return web.json_response({"userId": user_id, "stopped": stopped})


async def block_user(request: web.Request) -> web.Response:
    """``POST|DELETE /admin/users/{userId}/block``: block (and stop) or unblock a user."""
    state = _state(request)
    user_id = _user_id(request)
    blocked = request.method == "POST"
    drain = _seconds(request, "drainTimeout", DEFAULT_DRAIN_TIMEOUT_S)
    state.blocklist.set(user_id, blocked)
    log.info("user blocked" if blocked else "user unblocked", user_id=user_id)
    answer: dict[str, Any] = {"userId": user_id, "blocked": blocked}
    if blocked and state.supervisor.has_instance(user_id):
        # New requests are refused from now on; the instance stops once those in flight end.
        try:
            answer["stopped"] = await state.supervisor.stop_instance(user_id, drain)
        except TimeoutError as exc:
            # The block holds all the same; the requests in flight go on and the instance
            # stays until dbTTL (it gets no new request).
            log.warning("blocked user's requests still in flight", user_id=user_id)
            answer.update(stopped=False, message=str(exc))
    return web.json_response(answer)


async def hold_user(request: web.Request) -> web.Response:
    """``POST|DELETE /admin/users/{userId}/hold``: hold a user for maintenance, or release."""
    state = _state(request)
    supervisor = state.supervisor
    user_id = _user_id(request)
    if request.method == "DELETE":
        supervisor.release_hold(user_id)
        log.info("hold released", user_id=user_id)
        return web.json_response({"userId": user_id, "held": False})
    ttl = _seconds(request, "ttl", DEFAULT_HOLD_TTL_S)
    drain = _seconds(request, "drainTimeout", DEFAULT_DRAIN_TIMEOUT_S)
    try:
        stopped = await supervisor.hold(user_id, drain, ttl_s=ttl)
    except TimeoutError as exc:  # the hold was released
        raise BadAdminRequestError(str(exc)) from None
    log.info("user held", user_id=user_id, stopped=stopped, ttl_s=ttl)
    return web.json_response({"userId": user_id, "held": True, "stopped": stopped})


def _users_on_disk(db_dir: str) -> list[dict[str, Any]]:
    """``[{"userId", "diskBytes"}]`` for each directory of ``db_dir`` named as a user id
    (`auth.USER_ID_RE`: ``.stcs`` and staging directories are not), sorted by id."""
    users = []
    with os.scandir(db_dir) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False) and USER_ID_RE.fullmatch(entry.name):
                users.append({"userId": entry.name, "diskBytes": tree_bytes(entry.path)})
    return sorted(users, key=lambda u: u["userId"])


async def list_users(request: web.Request) -> web.Response:
    """``GET /admin/users``: ``{"users": [{"userId", "diskBytes"}]}``, every user whose
    directory is on this node's disk (running or not), with its size in bytes (files as
    stored: what a copy moves).  Read in a thread (one ``stat`` per file)."""
    state = _state(request)
    users = await asyncio.to_thread(_users_on_disk, str(state.settings.db_dir))
    if state.placement is not None:
        for user in users:
            user["placement"] = state.placement.state_of(user["userId"])
    return web.json_response({"users": users})


def _placement(state: State) -> Placement:
    if state.placement is None:  # only app-less test states lack one
        raise BadAdminRequestError("no cluster placement on this server")
    return state.placement


async def cluster_view(request: web.Request) -> web.Response:
    """``GET /admin/cluster``: ``{"nodes": [HOST:PORT], "self": HOST:PORT, "arriving":
    [userId], "moved": {userId: HOST:PORT}}`` (`stcs.placement.Placement.view`)."""
    return web.json_response(_placement(_state(request)).view())


async def user_placement(request: web.Request) -> web.Response:
    """``PUT /admin/users/{userId}/placement`` with ``{"state": "arriving" | "moved" | "home",
    "to": "HOST:PORT"}`` (``to``: where a moved user went).  ``arriving`` and ``moved`` first
    hold the user (requests in flight finish, at most ``?drainTimeout=S``, default 300; the
    instance stops), then save the mark, then release: from then on the user's requests here
    get 503 ``InternalError`` + ``Retry-After`` (`errors.UserMovingError`).  ``home`` clears
    the mark.  ``{"userId", "state", "stopped": bool}``; 400 for a bad body or a drain that
    timed out (nothing marked)."""
    state = _state(request)
    placement = _placement(state)
    user_id = _user_id(request)
    drain = _seconds(request, "drainTimeout", DEFAULT_DRAIN_TIMEOUT_S)
    try:
        body = await request.json()
        mark, to = body["state"], str(body.get("to") or "")
        if mark not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
    except (ValueError, KeyError, TypeError) as exc:
        raise BadAdminRequestError(f'expected {{"state": ...}}: {exc}') from None
    supervisor = state.supervisor
    stopped = False
    if mark == HOME:
        await asyncio.to_thread(placement.set_state, user_id, mark, to)
    else:
        try:
            stopped = await supervisor.hold(user_id, drain)
        except TimeoutError as exc:
            raise BadAdminRequestError(str(exc)) from None
        try:
            await asyncio.to_thread(placement.set_state, user_id, mark, to)
        finally:
            if not supervisor.has_maintenance_hold(user_id):
                supervisor.release_hold(user_id)
    log.info("user placement", user_id=user_id, state=mark, to=to or None, stopped=stopped)
    return web.json_response({"userId": user_id, "state": mark, "stopped": stopped})


async def set_cluster(request: web.Request) -> web.Response:
    """``PUT /admin/cluster`` with ``{"nodes": "HOST:PORT,…", "next": "HOST:PORT,…"}``: use
    this node list from now on (`Placement.set_nodes`: kept in ``cluster.json``, in force until
    ``clusterNodes`` changes in ``config.yml``); ``next`` (optional; absent or empty clears
    it): the list a change under way goes to — never-seen users whose node differs between the
    two are refused until the change is done.  Answers as ``GET``.  400 for a bad list or on a
    node that is not in a cluster."""
    placement = _placement(_state(request))
    try:
        body = await request.json()
        nodes, following = body["nodes"], body.get("next") or ""
        if not isinstance(nodes, str) or not isinstance(following, str):
            raise ValueError("nodes and next must be strings")
        await asyncio.to_thread(placement.set_nodes, nodes, following)
    except (ValueError, KeyError, TypeError) as exc:
        raise BadAdminRequestError(f'expected {{"nodes": "HOST:PORT,…"}}: {exc}') from None
    log.warning("cluster node list set", nodes=placement.run_nodes, next=placement.run_next)
    return web.json_response(placement.view())


# -- a user's files, copied between nodes (stcs.transfer) ----------------------------------


def _mark(state: State, user_id: str) -> str:
    return state.placement.state_of(user_id) if state.placement is not None else HOME


@contextlib.contextmanager
def _transfer(state: State, user_id: str, required: str | None) -> Iterator[None]:
    """One data call at a time per user, and only in placement mark ``required`` (None: any).
    Raises PlacementConflictError."""
    placement = _placement(state)
    if required is not None and placement.state_of(user_id) != required:
        raise PlacementConflictError(
            f"{user_id} is not marked {required} on this node "
            f"(it is {placement.state_of(user_id)}): refused"
        )
    if user_id in placement.transfers:
        raise PlacementConflictError(f"another data call for {user_id} is under way")
    placement.transfers.add(user_id)
    try:
        yield
    finally:
        placement.transfers.discard(user_id)


async def _paths(request: web.Request) -> list[tuple[str, ...]]:
    try:
        body = await request.json()
    except ValueError:
        raise BadAdminRequestError('expected {"paths": [relative path, ...]}') from None
    return transfer.check_paths(body.get("paths") if isinstance(body, dict) else None)


async def user_manifest(request: web.Request) -> web.Response:
    """``GET /admin/users/{userId}/manifest``: ``{"userId", "takenAtNs": int (this node's
    wall clock in ns, read before the walk), "files": [{"path", "size": bytes, "mtimeNs":
    int}], "blocked": bool, "limits": {key: value} (the overrides), "placement": mark}``
    (`transfer.manifest`: regular files only, no symlink followed).  404 ``NotFoundError``
    when the user has no directory here, unless marked ``arriving`` (an empty list)."""
    state = _state(request)
    user_id = _user_id(request)
    mark = _mark(state, user_id)
    taken = time.time_ns()
    try:
        files = await asyncio.to_thread(transfer.manifest, str(state.settings.db_dir / user_id))
    except OSError as exc:
        raise BadAdminRequestError(
            f"{user_id}'s directory cannot be read: {exc.strerror}"
        ) from None
    if files is None:
        if mark != ARRIVING:
            raise NoUserDataError(f"no data for {user_id} on this node")
        files = []
    return web.json_response(
        {
            "userId": user_id,
            "takenAtNs": taken,
            "files": files,
            "blocked": user_id in state.blocklist,
            "limits": state.quotas.overrides.users.get(user_id, {}),
            "placement": mark,
        }
    )


async def user_export(request: web.Request) -> web.StreamResponse:
    """``POST /admin/users/{userId}/export`` with ``{"paths": [...]}``: the files as an
    uncompressed PAX tar, streamed (`transfer.ExportStream`: each member's mtime in ns as
    ``STCS.mtime_ns``).  400 for a path outside the user's directory or not a regular file
    (before any byte is sent); 404 when the user has no directory here."""
    state = _state(request)
    user_id = _user_id(request)
    export = transfer.ExportStream(str(state.settings.db_dir / user_id), await _paths(request))
    try:
        await asyncio.to_thread(export.check)
    except FileNotFoundError:
        raise NoUserDataError(f"no data for {user_id} on this node") from None
    except OSError as exc:
        raise BadAdminRequestError(
            f"{user_id}'s directory cannot be read: {exc.strerror}"
        ) from None
    response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
    await response.prepare(request)
    pieces = export.pieces()
    try:
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            await response.write(piece)
    finally:
        await asyncio.to_thread(pieces.close)
    await response.write_eof()
    log.info("user exported", user_id=user_id, files=export.files, bytes=export.bytes)
    return response


async def user_import(request: web.Request) -> web.Response:
    """``POST /admin/users/{userId}/import`` with a tar body (as ``…/export`` sends it):
    extract it into the user's directory (`transfer.import_tar`; files 0600 written to a
    temporary name and renamed over, mtime from ``STCS.mtime_ns``; directories 0700).  Only
    for a user marked ``arriving`` here (else 409: a served or stale copy is never
    overwritten).  ``{"userId", "files": n, "bytes": n}``.  400 for a member that is not a
    regular file or directory or whose path escapes, 507 when the disk lacks the room."""
    state = _state(request)
    user_id = _user_id(request)
    with _transfer(state, user_id, ARRIVING):
        db_dir = str(state.settings.db_dir)
        if request.content_length is not None:
            fd = os.open(db_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                transfer.check_free(fd, request.content_length)
            finally:
                os.close(fd)
        reader = transfer.BodyReader(request.content, asyncio.get_running_loop())
        report = await asyncio.to_thread(transfer.import_tar, os.path.join(db_dir, user_id), reader)
    log.info("user imported", user_id=user_id, files=report.files, bytes=report.bytes)
    return web.json_response({"userId": user_id, "files": report.files, "bytes": report.bytes})


async def user_prune(request: web.Request) -> web.Response:
    """``POST /admin/users/{userId}/prune`` with ``{"paths": [...]}``: delete those files,
    then the directories left empty (`transfer.prune`).  Only for a user marked ``arriving``
    here (else 409).  ``{"userId", "removed": n}``; 400 for a path outside the directory."""
    state = _state(request)
    user_id = _user_id(request)
    paths = await _paths(request)
    with _transfer(state, user_id, ARRIVING):
        removed = await asyncio.to_thread(
            transfer.prune, str(state.settings.db_dir / user_id), paths
        )
    log.info("user pruned", user_id=user_id, removed=removed)
    return web.json_response({"userId": user_id, "removed": removed})


def _remove_copy(layout: Layout, user_id: str) -> bool:
    """Rename the user's directory into ``.stcs`` (so no request can ever see half of it),
    then delete it; under the user's directory lock.  Whether there was one.  Raises
    PlacementConflictError when a process holds the lock, OSError."""
    trash = layout.removed_copy(user_id, time.time_ns())
    try:
        with user_dir_locked(layout, user_id):
            os.rename(layout.user_dir(user_id), trash)
    except BlockingIOError:
        raise PlacementConflictError(f"{user_id}'s directory is open by a process") from None
    except FileNotFoundError:
        return False
    shutil.rmtree(trash)
    return True


async def user_data_delete(request: web.Request) -> web.Response:
    """``DELETE /admin/users/{userId}/data``: remove the old copy of a user marked ``moved``
    (`stcs cluster cleanup`), then clear the mark (the user is then one this node never saw:
    the ring decides).  409 for a user not marked ``moved``.  ``{"userId", "removed": bool}``.
    """
    state = _state(request)
    user_id = _user_id(request)
    placement = _placement(state)
    with _transfer(state, user_id, MOVED):
        removed = await asyncio.to_thread(_remove_copy, Layout(state.settings.db_dir), user_id)
        await asyncio.to_thread(placement.set_state, user_id, HOME)
    log.warning("old copy removed", user_id=user_id, removed=removed)
    return web.json_response({"userId": user_id, "removed": removed})


async def add_user(request: web.Request) -> web.Response:
    """``PUT /admin/users/{userId}``: create the user's directory (0700), for
    ``autoCreateUsers: false``.  ``{"userId": ..., "created": bool}`` (false: it existed).
    In a cluster, 409 for a new user the ring (or a change under way) places on another
    node."""
    state = _state(request)
    user_id = _user_id(request)
    placement = state.placement
    if placement is not None and not (state.settings.db_dir / user_id).is_dir():
        # In a cluster, only on the node the ring (and a change under way) gives the user:
        # added elsewhere, they would be served by no router, or miss a move.
        try:
            placement.check_owner(user_id)
        except NotOwnerError as exc:
            raise PlacementConflictError(
                f"{user_id} is not this node's to add ({exc}): add them on their node"
            ) from None
    created = await asyncio.to_thread(create_user, state.settings.db_dir, user_id)
    log.info("user added" if created else "user exists", user_id=user_id)
    return web.json_response({"userId": user_id, "created": created})


def add_routes(app: web.Application) -> None:
    """Register the admin endpoints (before the catch-all proxy route)."""
    app.router.add_get("/admin-health", admin_health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/admin/instances", list_instances)
    app.router.add_delete("/admin/instances/{user_id}", stop_instance)
    app.router.add_get("/admin/users", list_users)
    app.router.add_get("/admin/cluster", cluster_view)
    app.router.add_put("/admin/cluster", set_cluster)
    app.router.add_get("/admin/users/{user_id}/manifest", user_manifest, allow_head=False)
    app.router.add_post("/admin/users/{user_id}/export", user_export)
    app.router.add_post("/admin/users/{user_id}/import", user_import)
    app.router.add_post("/admin/users/{user_id}/prune", user_prune)
    app.router.add_delete("/admin/users/{user_id}/data", user_data_delete)
    app.router.add_put("/admin/users/{user_id}/placement", user_placement)
    app.router.add_put("/admin/users/{user_id}", add_user)
    app.router.add_route("POST", "/admin/users/{user_id}/block", block_user)
    app.router.add_route("DELETE", "/admin/users/{user_id}/block", block_user)
    app.router.add_get("/admin/users/{user_id}/limits", user_limits, allow_head=False)
    app.router.add_put("/admin/users/{user_id}/limits", user_limits)
    app.router.add_route("POST", "/admin/users/{user_id}/hold", hold_user)
    app.router.add_route("DELETE", "/admin/users/{user_id}/hold", hold_user)
