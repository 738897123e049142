"""``/ready`` (`stcs.readiness`) in-process: starting, draining, the disk checks' cadence.
Through a real ``stcs serve`` on a file system the test fills: tests/e2e/test_readiness.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from stcs.app import create_app, open_state
from stcs.config import load_settings
from stcs.readiness import Readiness
from stcs.relay import Relay
from stcs.state import STATE, State


def test_not_ready_while_starting_or_draining(tmp_path: Path) -> None:
    draining = [False]
    ready = Readiness(tmp_path, lambda: draining[0])
    assert ready.reason() == "starting"
    ready.mark_started()
    assert ready.reason() is None
    draining[0] = True
    assert ready.reason() == "draining"


def test_disk_checks_are_remembered_for_a_second(tmp_path: Path) -> None:
    now = [100.0]
    db = tmp_path / "db"
    db.mkdir()
    ready = Readiness(db, lambda: False, clock=lambda: now[0])
    ready.mark_started()
    assert ready.reason() is None
    db.rmdir()  # gone: not writable, once the remembered answer is old
    assert ready.reason() is None
    now[0] += Readiness.CHECK_EVERY_S
    assert ready.reason() == "dbPath not writable"


@contextlib.asynccontextmanager
async def relay_on(tmp_path: Path) -> AsyncIterator[tuple[State, str]]:
    """The relay on a state this test opens itself (`open_state`, as `server.serve` does), on
    a loopback port: the state and the relay's URL."""
    settings = load_settings(cli={"dbPath": str(tmp_path / "db")}, environ={}).settings
    async with open_state(settings) as state:
        relay = Relay(state, str(tmp_path / "no-control.sock"))
        server = await asyncio.get_running_loop().create_server(relay, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            yield state, f"http://127.0.0.1:{port}"
        finally:
            server.close()
            relay.close_all()


async def test_ready_and_health_in_the_relay_starting_ready_draining(tmp_path: Path) -> None:
    async with relay_on(tmp_path) as (state, url), aiohttp.ClientSession() as client:
        async with client.get(f"{url}/ready") as resp:  # no listener has said it started
            assert resp.status == 503
            assert await resp.json() == {"status": "not ready", "reason": "starting"}
        state.readiness.mark_started()
        async with client.get(f"{url}/ready") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ready"}
        async with client.get(f"{url}/health") as resp:
            assert resp.status == 200 and await resp.json() == {"status": "ok"}
        state.begin_shutdown()
        async with client.get(f"{url}/ready") as resp:
            assert resp.status == 503 and (await resp.json())["reason"] == "draining"
        async with client.get(f"{url}/health") as resp:
            assert resp.status == 503


async def test_other_methods_on_the_relays_own_paths_get_405_from_the_control_plane(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """The relay answers ``GET /health``, ``/ready`` and ``/auth`` and passes other methods to
    the control plane, which answers 405 with what the path takes; aiohttp's ``on_shutdown``
    still turns the shutdown flag on."""
    settings = load_settings(cli={"dbPath": str(tmp_path / "db")}, environ={}).settings
    async with open_state(settings) as state:
        app = create_app(state)
        client = await aiohttp_client(app)
        for method, path, allow in [
            ("POST", "/health", "GET,HEAD"),
            ("DELETE", "/ready", "GET,HEAD"),
            ("HEAD", "/auth", "GET"),
            ("POST", "/auth", "GET"),
        ]:
            resp = await client.request(method, path)
            assert (resp.status, resp.headers["Allow"]) == (405, allow), (method, path)
        assert app[STATE] is state
        await app.shutdown()
        assert state.shutting_down
