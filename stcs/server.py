"""Run stcs: the relay (data plane) on the public port, the aiohttp application (control plane)
on a private unix socket; wait for SIGTERM/SIGINT; shut down in a fixed, bounded order.

Why not `aiohttp.web.run_app`: its graceful shutdown first marks every connection closing, and
from then on aiohttp drops the bytes that still arrive on it (aio-libs/aiohttp#2298, closed
"wontfix").  A request whose body is still uploading at SIGTERM — a chroma ``add`` — could then
never finish and would be cut at the timeout.  So the order here is (as uvicorn's):

1. the signal handler only sets a flag (a second signal skips the wait below);
2. ``/health`` turns 503 and new requests on open connections get 503 ``ShuttingDownError``;
3. the listening socket closes, idle keep-alive connections close (busy ones keep reading);
4. wait until the requests in flight are done, at most ``grace_s`` seconds;
5. the remaining client connections are aborted; aiohttp closes the control socket, then
   `serve` closes the state it opened (`app.open_state`), tearing the services down in
   reverse: the supervisor stops every child (SIGTERM, then SIGKILL after ``dbStopTimeout``),
   quotas, pools and sessions close, the ``dbPath`` lock is released.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import socket
import ssl
import tempfile
import time
from collections.abc import Callable

import structlog
from aiohttp import web

from stcs import activation
from stcs import log as log_mod
from stcs import reload as reload_mod
from stcs.app import SERVER_OPTIONS, create_app, open_state
from stcs.config import Resolved, Settings
from stcs.relay import Relay
from stcs.state import State

log = structlog.get_logger("stcs.server")

# After the drain, aiohttp gets this long to finish handlers that are still running (s).
HANDLER_CLOSE_TIMEOUT_S = 1.0


# File descriptors kept beside two per client connection (client side, upstream side): children's
# log files and locks, pooled upstream connections, the auth session, logs.
FD_RESERVE = 1024


def raise_fd_limit(max_connections: int, held_ports: int = 0) -> int:
    """Raise the soft open-files limit towards what ``max_connections`` and ``held_ports``
    (one socket per port of childPortRange, `stcs.ports`) need (never past the hard limit);
    return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * max_connections + FD_RESERVE + held_ports
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-files limit", wanted=want, error=str(exc))
    if soft < 2 * max_connections + FD_RESERVE + held_ports:
        log.warning(
            "open-files limit lower than maxConnections needs",
            limit=soft,
            max_connections=max_connections,
        )
    return soft


async def serve(
    settings: Settings,
    *,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    grace_s: float = 10.0,
    sockets: list[socket.socket] | None = None,
    load: Callable[[], Resolved] | None = None,
) -> None:
    """Serve ``settings``'s stcs on ``host:port`` until SIGTERM or SIGINT, then shut down as
    above.  The one owner of the service's lifecycle: it opens the `State` (`app.open_state`),
    hands it to the relay and to the control application (`app.create_app`), and closes it
    last.

    ``sockets``: listening sockets passed by systemd (`stcs.activation`), served instead of
    binding ``host:port``; at shutdown stcs only stops accepting on them (the listening socket
    stays open in systemd, new connections wait in its backlog for the next stcs).
    ``load``: reads the configuration again on SIGHUP (`stcs.reload`; None: SIGHUP only
    reopens ``logFile``).

    Raises LockHeldError (another stcs holds ``dbPath``) or OSError (cannot listen); in both
    cases everything started is cleaned up first.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hurry = asyncio.Event()
    hup = asyncio.Event()

    def on_signal() -> None:  # only sets flags: no logging, no awaiting in a signal handler
        (hurry if stop.is_set() else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    # SIGHUP: reopen logFile (logrotate) and reload the settings, in `_on_hup`'s task.
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    # The control socket lives in a fresh 0700 directory: only stcs's uid can reach it.
    control_dir = tempfile.mkdtemp(prefix="stcs-control-")
    control_socket = os.path.join(control_dir, "control.sock")
    try:
        # The services (dbPath lock, ..., supervisor): opened first, closed last, in reverse.
        async with open_state(settings) as state:
            runner = web.AppRunner(
                create_app(state),
                handle_signals=False,
                access_log=None,
                shutdown_timeout=HANDLER_CLOSE_TIMEOUT_S,
                **SERVER_OPTIONS,
            )
            relay: Relay | None = None
            hup_task: asyncio.Task[None] | None = None
            try:
                await runner.setup()
                await web.UnixSite(runner, control_socket).start()
                raise_fd_limit(
                    state.settings.max_connections, state.ports.counts().size if state.ports else 0
                )
                relay = Relay(state, control_socket)
                scheme = "https" if ssl_context else "http"
                if sockets:
                    servers = [
                        await loop.create_server(relay, sock=sock, ssl=ssl_context, backlog=1024)
                        for sock in sockets
                    ]
                    for sock in sockets:
                        url = f"{scheme}://{activation.describe(sock)}"
                        log.info("listening", url=url, socket_activation=True)
                else:
                    servers = [
                        await loop.create_server(relay, host, port, ssl=ssl_context, backlog=1024)
                    ]
                    log.info("listening", url=f"{scheme}://{host}:{port}")
                state.readiness.mark_started()
                hup_task = asyncio.create_task(_on_hup(hup, state, relay, load), name="stcs-sighup")
                await stop.wait()

                state.begin_shutdown()
                log.info("shutting down", requests_in_flight=state.in_flight, grace_s=grace_s)
                # Stop accepting at once: with socket activation new connections now wait in the
                # kernel's backlog for the next stcs instead of being accepted and refused here.
                for server in servers:
                    server.close()
                relay.close_idle()
                started = time.monotonic()
                drained = asyncio.ensure_future(state.idle.wait())
                hurried = asyncio.ensure_future(hurry.wait())
                await asyncio.wait(
                    {drained, hurried}, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED
                )
                drained.cancel()
                hurried.cancel()
                if state.in_flight:
                    log.warning("requests still in flight at shutdown", count=state.in_flight)
                else:
                    log.info(
                        "requests drained", drain_ms=round((time.monotonic() - started) * 1000, 1)
                    )
            finally:
                if hup_task is not None:
                    hup_task.cancel()
                if relay is not None:
                    relay.close_all()
                await runner.cleanup()
    finally:
        shutil.rmtree(control_dir, ignore_errors=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def _on_hup(
    hup: asyncio.Event, state: State, relay: Relay, load: Callable[[], Resolved] | None
) -> None:
    """On each SIGHUP: reopen ``logFile``, then reload the settings (`stcs.reload`).  Signals
    arriving during a reload are folded into one more reload."""
    while True:
        await hup.wait()
        hup.clear()
        log_mod.reopen()
        if load is not None:
            try:
                await reload_mod.reload(state, relay, load)
            except Exception:  # a bug in applying must not end SIGHUP handling
                log.exception("settings reload failed")
