"""Nothing piles up per user (issue 19, item 6): a user's lock file exists only while their
chroma may run, and their child log is removed once ``childLogRetention`` has passed with no
instance.  Counted with the real launcher and supervisor over 1,000 users whose "chroma" is the
fastest real stand-in (tests/upstreams/heartbeat.py); one real chroma shows the wiring."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from stcs.launcher import ChromaLauncher
from stcs.layout import Layout
from stcs.supervisor import Supervisor
from stcs.upstream import UpstreamPool
from tests.harness import StcsServer, client_for, new_token

STANDIN = Path(__file__).parents[1] / "upstreams" / "heartbeat.py"
USERS = 1000


def files_under(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file()) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_1000_users_started_and_culled_leave_no_lock_file_and_logs_only_until_retention(
    tmp_path: Path,
) -> None:
    db = tmp_path / "db"
    layout = Layout(db)
    now = [1000.0]
    with contextlib.closing(UpstreamPool()) as pool:
        launcher = ChromaLauncher(
            db,
            pool,
            command=[sys.executable, "-S", str(STANDIN)],
            user_ids_are_secret=True,
            log_retention_ms=3_600_000,
            # 25 stand-ins bind kernel-chosen ports at once beside whatever else runs here; a
            # port taken between the free-port check and the bind is retried on another.
            max_retries=10,
        )
        supervisor = Supervisor(
            launcher,
            ttl_ms=1000,
            max_instances=USERS,
            queue_timeout_ms=60_000,
            min_free_memory_mb=0,
            clock=lambda: now[0],
            housekeeping=launcher.housekeeping,
        )
        users = [str(uuid.uuid4()) for _ in range(USERS)]
        started = time.monotonic()
        for batch in range(0, USERS, 25):
            group = users[batch : batch + 25]

            async def use(user_id: str) -> None:
                async with supervisor.acquire(user_id):
                    pass

            await asyncio.gather(*(use(u) for u in group))
            now[0] += 2  # past dbTTL: the cull stops the whole batch
            culled = supervisor.tick(now[0])
            assert len(culled) == len(group)
            await asyncio.gather(*(i.stop_task for i in culled if i.stop_task))
        elapsed = time.monotonic() - started
        await supervisor.close()
        # Every user was started and culled; what is left on disk:
        locks = files_under(layout.locks_dir)
        logs = files_under(layout.logs_dir)
        user_dirs = sum(1 for p in db.iterdir() if not p.name.startswith("."))
        assert (user_dirs, locks, logs) == (USERS, 0, USERS), elapsed
        # Within the retention the logs stay (one per user, for the operator); past it the
        # housekeeping removes them, and nothing else.
        assert launcher.prune_logs(frozenset(), now=time.time()) == 0
        (layout.logs_dir / "notes.txt").write_text("the operator's")
        assert launcher.prune_logs(frozenset(users[:1]), now=time.time() + 3601) == USERS - 1
        assert sorted(p.name for p in layout.logs_dir.iterdir()) == sorted(
            [launcher.log_path(users[0]).name, "notes.txt"]
        )
        launcher.ports.close()


def test_a_culled_real_chroma_leaves_no_lock_file(stcs: Callable[..., StcsServer]) -> None:
    server = stcs("--dbTTL", "500")
    client_for(server, new_token()).heartbeat()
    locks = Layout(server.db).locks_dir
    assert len(list(locks.iterdir())) == 1  # held while the instance runs
    server.wait_event("instance stopped", where=lambda e: e["reason"] == "idle", timeout=20)
    assert list(locks.iterdir()) == []


def test_child_logs_past_the_retention_are_removed_by_the_running_server(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs(
        "--dbTTL",
        "300",
        "--childLogRetention",
        "1000",
        "--chromaCommand",
        f"{sys.executable} -S {STANDIN}",
    )
    resp = requests.get(
        f"{server.url}/api/v2/heartbeat", headers={"x-chroma-token": new_token()}, timeout=30
    )
    assert resp.status_code == 200
    logs = Layout(server.db).logs_dir
    assert len(list(logs.iterdir())) == 1
    server.wait_event("child logs removed", timeout=20)
    assert list(logs.iterdir()) == []
