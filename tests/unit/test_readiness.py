"""``/ready`` (`stcs.readiness`) in-process: starting, draining, the disk checks' cadence.
Through a real ``stcs serve`` on a file system the test fills: tests/e2e/test_readiness.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stcs.app import create_app
from stcs.config import load_settings
from stcs.readiness import Readiness
from stcs.state import STATE


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


async def test_ready_in_the_control_plane_starting_ready_draining(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    settings = load_settings(cli={"dbPath": str(tmp_path / "db")}, environ={}).settings
    app = create_app(settings)
    client = await aiohttp_client(app)
    resp = await client.get("/ready")  # no listener has said it started
    assert resp.status == 503 and await resp.json() == {"status": "not ready", "reason": "starting"}
    app[STATE].readiness.mark_started()
    resp = await client.get("/ready")
    assert resp.status == 200 and await resp.json() == {"status": "ready"}
    await app.shutdown()
    resp = await client.get("/ready")
    assert resp.status == 503 and (await resp.json())["reason"] == "draining"
