"""``/ready`` (readiness) apart from ``/health`` (liveness): `stcs.readiness`, and through a real
``stcs serve`` on a file system the test fills (a tmpfs it mounts; skipped where mounting is
not permitted)."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from stcs.readiness import Readiness
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
