"""``/ready`` (readiness) apart from ``/health`` (liveness): `stcs.readiness`, and through a real
``stcs serve`` on a file system the test fills (a tmpfs it mounts; skipped where mounting is
not permitted)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from stcs.app import create_app
from stcs.config import load_settings
from stcs.readiness import Readiness
from stcs.state import STATE
from tests.harness import StcsServer


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    path.mkdir(mode=0o700)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


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


def test_a_full_dbpath_is_not_ready(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "1m") as db:
        ready = Readiness(db, lambda: False)
        ready.mark_started()
        assert ready.reason() is None
        fill(db)
        ready = Readiness(db, lambda: False)
        ready.mark_started()
        assert ready.reason() == "dbPath full"


def wait_ready(server: StcsServer, status: int, timeout: float = 10) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        got = requests.get(f"{server.url}/ready", timeout=5)
        if got.status_code == status or time.monotonic() > deadline:
            assert got.status_code == status, got.text
            return dict(got.json())
        time.sleep(0.1)


def fill(directory: Path) -> Path:
    """Write zeros into ``directory/filler`` until the file system is full."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
    return filler


def test_ready_follows_a_full_dbpath_while_health_stays_ok(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "db", "8m") as db:
        server = stcs(db=db)
        assert wait_ready(server, 200) == {"status": "ready"}
        filler = fill(db)
        body = wait_ready(server, 503)
        assert body == {"status": "not ready", "reason": "dbPath full"}
        assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
        head = requests.head(f"{server.url}/ready", timeout=5)
        assert head.status_code == 503 and head.content == b""
        filler.unlink()
        wait_ready(server, 200)


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
