"""The control plane: the aiohttp application, its routes and the owners of resources.

Endpoints: ``GET /admin-health``, ``/admin/*`` and ``GET /metrics`` (admin key).  It listens on
a private unix socket; the relay (`stcs.relay`, the data plane) owns the public port, answers
``GET /health``, ``GET /ready`` and ``GET /auth`` itself, passes the other control paths here
unchanged (other methods on those three get 405 here) and proxies everything else to the users'
chroma servers.

The services are built once, by `open_state`, and torn down in reverse order: the supervisor
(children), quotas, pools and sessions, the ``dbPath`` lock.  `server.serve` opens the state and
hands it to the relay and to `create_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from stcs import admin
from stcs.answers import UNEXPECTED, ErrorAnswer, answer_for
from stcs.auth import (
    AuthServerHealth,
    AuthServerResolver,
    Blocklist,
    ExistingUsersResolver,
    Resolver,
    UuidResolver,
    tls_context,
)
from stcs.config import Settings
from stcs.datadir import DbPathLock, stop_orphans
from stcs.errors import RequestError
from stcs.launcher import ChromaLauncher
from stcs.layout import Layout
from stcs.memory import MemoryWatch
from stcs.metrics import Metrics
from stcs.placement import Placement
from stcs.quotas import Quotas
from stcs.state import STATE, State
from stcs.supervisor import Supervisor
from stcs.upstream import UpstreamPool

log = structlog.get_logger("stcs.app")


# Options for aiohttp's server (`web.run_app(..., **SERVER_OPTIONS)`).  auto_decompress off: a
# gzip request body must reach chroma exactly as sent, under its own Content-Encoding header.
SERVER_OPTIONS: dict[str, Any] = {"auto_decompress": False}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: RequestError) -> web.Response:
    """The response for ``exc`` as `stcs.answers` maps it (chroma's JSON error body)."""
    return answer_response(answer_for(exc))


def answer_response(answer: ErrorAnswer) -> web.Response:
    return web.json_response(
        {"error": answer.name, "message": answer.message},
        status=answer.status,
        headers=dict(answer.headers),
    )


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn typed errors into chroma's error responses; never a traceback for a client.

    The request line, metrics and in-flight count of control-plane requests are the relay's
    (`stcs.relay`), which passes every request to this application."""
    try:
        return await handler(request)
    except RequestError as exc:
        return error_response(exc)
    except web.HTTPException:  # router's 404/405
        raise
    except Exception:
        log.exception("request failed")
        return answer_response(UNEXPECTED)


def _answered_by_the_relay(allowed: frozenset[str]) -> Handler:
    """A control-plane route for a path the relay answers itself (``GET /health``, ``/ready``,
    ``/auth``): what reaches it is another method, relayed here unchanged; it gets the 405
    (with ``Allow``) that aiohttp's router gives a method a path does not take."""

    async def method_not_allowed(request: web.Request) -> web.StreamResponse:
        raise web.HTTPMethodNotAllowed(request.method, allowed)

    return method_not_allowed


@contextlib.asynccontextmanager
async def open_state(settings: Settings) -> AsyncIterator[State]:
    """Build every service of a serving stcs, in order, and tear them down in reverse.

    Order: the ``dbPath`` lock (first: when another stcs holds it nothing else is made), leftover
    children of an earlier run stopped, the auth-server session and resolver, the upstream pool
    (every call to a child: requests, probes, counts), the launcher and the supervisor, the
    blocklist, quotas; then the supervisor's loops start, then the memory watch
    (``userMaxMemoryMB``).  On exit: the supervisor stops every child (SIGTERM, then SIGKILL after
    ``dbStopTimeout``), then quotas, pools and sessions close and the lock is released.

    Raises LockHeldError (another stcs serves this ``dbPath``) or OSError; what was built is
    torn down first.
    """
    async with contextlib.AsyncExitStack() as stack:
        db_dir = settings.db_dir
        lock = DbPathLock(db_dir)
        lock.acquire()
        stack.callback(lock.release)
        found = await asyncio.to_thread(stop_orphans, db_dir, settings.db_stop_timeout / 1000)
        if found:
            log.warning("stopped leftover chroma servers", count=len(found), pids=found)
        metrics = Metrics()
        layout = Layout(db_dir)
        # The ring is read through the state's settings once serving, so a reload applies it.
        holder: list[State] = []
        placement = Placement(lambda: holder[0].settings if holder else settings, layout)
        resolver, auth_server = await _resolver(settings, metrics, stack, placement)
        # The one client to the children: proxied requests, heartbeat probes, quotas' counts.
        upstream_pool = UpstreamPool()
        stack.callback(upstream_pool.close)
        chroma = ChromaLauncher(
            db_dir,
            upstream_pool,
            command=settings.chroma_argv,
            start_timeout_ms=settings.db_start_timeout,
            stop_timeout_ms=settings.db_stop_timeout,
            max_retries=settings.db_max_retries,
            logs_dir=settings.resolved_child_log_dir,
            log_max_bytes=settings.child_log_max_bytes,
            user_ids_are_secret=settings.user_ids_are_secret,
            port_range=settings.child_ports,
            create_dirs=settings.auto_create_users,
            log_retention_ms=settings.child_log_retention,
        )
        stack.callback(chroma.ports.close)  # after the supervisor has stopped every child
        supervisor = Supervisor(
            chroma,
            ttl_ms=settings.db_ttl,
            max_instances=settings.db_max_instances,
            queue_timeout_ms=settings.queue_timeout,
            min_free_memory_mb=settings.db_min_free_memory_mb,
            recorder=metrics,
            on_instance_gone=upstream_pool.forget,
            liveness_timeout_ms=settings.db_liveness_timeout,
            housekeeping=chroma.housekeeping,
            new_users_per_minute=settings.address_new_users_per_minute,
            is_new_user=lambda user_id: not layout.user_dir(user_id).is_dir(),
            admit_start=placement.admit_start,
        )
        metrics.bind(supervisor.snapshot)
        metrics.bind_ports(chroma.ports.counts)
        blocklist = Blocklist(layout.blocklist)
        quotas = Quotas(settings, db_dir, upstream_pool, metrics)
        metrics.bind_disk(quotas.sizes)
        await quotas.start()
        stack.push_async_callback(quotas.close)
        supervisor.start()
        stack.push_async_callback(supervisor.close)
        memory_watch = MemoryWatch(
            supervisor,
            lambda user_id: quotas.limits_for(user_id).user_max_memory_mb,
            settings.user_memory_check_interval,
        )
        memory_watch.start()
        stack.push_async_callback(memory_watch.close)  # closed before the supervisor
        state = State(
            settings=settings,
            metrics=metrics,
            blocklist=blocklist,
            resolver=resolver,
            auth_server=auth_server,
            supervisor=supervisor,
            quotas=quotas,
            upstream_pool=upstream_pool,
            ports=chroma.ports,
            placement=placement,
        )
        holder.append(state)
        yield state


async def _resolver(
    settings: Settings,
    metrics: Metrics,
    stack: contextlib.AsyncExitStack,
    placement: Placement | None = None,
) -> tuple[Resolver, AuthServerHealth | None]:
    """Token -> user id: the auth server's answer (its session closed by ``stack``), else the
    token as a UUID; with ``autoCreateUsers: false`` only users whose directory exists (in a
    cluster, ``placement``'s ring tells a misrouted user from an unknown one).  Also the auth
    server's health (None in UUID mode)."""
    resolver: Resolver
    health: AuthServerHealth | None = None
    if settings.auth_server_endpoint:
        auth_session = await stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=settings.auth_max_concurrent_lookups,
                    keepalive_timeout=30,
                    ssl=tls_context(settings.auth_server_ca_file),
                ),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        )
        health = AuthServerHealth(settings.auth_server_endpoint)
        resolver = AuthServerResolver(
            auth_session,
            settings.auth_server_endpoint,
            api_key=settings.auth_server_api_key,
            cache_ttl_ms=settings.auth_cache_ttl,
            timeout_ms=settings.auth_timeout,
            recorder=metrics,
            max_concurrent=settings.auth_max_concurrent_lookups,
            health=health,
            max_per_address=settings.auth_max_lookups_per_address,
        )
    else:
        resolver = UuidResolver()
    if not settings.auto_create_users:
        resolver = ExistingUsersResolver(
            resolver,
            settings.db_dir,
            check_owner=placement.check_owner if placement else None,
            in_cluster=placement.in_cluster if placement else None,
        )
    return resolver, health


async def _on_shutdown(app: web.Application) -> None:
    app[STATE].begin_shutdown()  # already begun when `server.serve` runs the app


def create_app(state: State) -> web.Application:
    """Build the control application on ``state`` (opened by `open_state`, whose owner —
    `server.serve`, or a test — closes it after the application is cleaned up).

    Serve it with `SERVER_OPTIONS` passed to aiohttp's server.
    """
    app = web.Application(middlewares=[request_middleware])
    app[STATE] = state
    app.on_shutdown.append(_on_shutdown)
    # GET /health, /ready (and HEAD) and GET /auth are the relay's (`stcs.relay.handler`).
    get_head = _answered_by_the_relay(frozenset({"GET", "HEAD"}))
    app.router.add_route("*", "/health", get_head)
    app.router.add_route("*", "/ready", get_head)
    admin.add_routes(app)
    app.router.add_route("*", "/auth", _answered_by_the_relay(frozenset({"GET"})))
    return app


__all__ = ["SERVER_OPTIONS", "STATE", "create_app", "open_state"]
