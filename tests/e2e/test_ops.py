"""Operating stcs: structured logs, metrics, admin API, status, backup and restore."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import pytest
import requests
import structlog

from stcs import log as log_mod
from tests.harness import (
    ADMIN,
    HDR,
    StcsServer,
    cli,
    client_for,
    new_token,
    scrape,
    slow_create,
    until_in_flight,
    user_dirs,
    wait_gone,
)


def test_log_lines_are_json_with_the_documented_fields(stcs: Callable[..., StcsServer]) -> None:
    server = stcs("--ttl", "1000", "--adminAPIKey", ADMIN)
    token = new_token()
    client_for(server, token).heartbeat()
    [child] = server.children()
    wait_gone(child.pid, 5)  # reaped after dbTTL: "instance stopped" reason idle
    client_for(server, token).heartbeat()
    [child] = server.children()
    child.kill()
    server.wait_event("instance crashed")
    server.stop()
    lines = server.log_path.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is JSON
    assert all({"event", "level", "timestamp"} <= e.keys() for e in events)
    for e in events:
        assert datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).tzinfo is not None
    proxied = [e for e in events if e["event"] == "request" and e["user_id"]]
    assert proxied
    for e in proxied:
        assert {
            "request_id",
            "user_id",
            "method",
            "path",
            "status",
            "duration_ms",
            "cold_start",
            "upstream_port",
            "client",
        } <= e.keys()
    assert any(e["cold_start"] for e in proxied) and any(not e["cold_start"] for e in proxied)
    started = [e for e in events if e["event"] == "instance started"]
    assert len(started) == 2 and all({"start_ms", "pid", "port"} <= e.keys() for e in started)
    reasons = [e["reason"] for e in events if e["event"] == "instance stopped"]
    assert reasons == ["idle", "crashed"]
    [crashed] = [e for e in events if e["event"] == "instance crashed"]
    assert "SIGKILL" in crashed["exit"]


def test_metrics_move_with_requests_starts_reaps_and_crashes(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs("--ttl", "1000", "--adminAPIKey", ADMIN)
    assert requests.get(f"{server.url}/metrics", timeout=10).status_code == 403
    before = scrape(server)
    token = new_token()
    client_for(server, token).heartbeat()
    after = scrape(server)
    ok_2xx = ("stcs_requests_total", (("method", "GET"), ("status_class", "2xx")))
    assert after[ok_2xx] >= before.get(ok_2xx, 0) + 3  # the client makes several requests
    assert after[("stcs_instance_starts_total", (("result", "ok"),))] == 1
    assert after[("stcs_instances_running", ())] == 1
    assert after[("stcs_children_rss_bytes", ())] > 10_000_000
    assert after[("stcs_instance_start_duration_seconds_count", ())] == 1
    assert after[("stcs_request_duration_seconds_count", ())] >= 3

    [child] = server.children()
    wait_gone(child.pid, 5)
    server.wait_event("instance stopped")  # logged in the same step as the metrics move
    reaped = scrape(server)
    assert reaped[("stcs_instance_stops_total", (("reason", "idle"),))] == 1
    assert reaped[("stcs_instances_running", ())] == 0

    client_for(server, token).heartbeat()
    [child] = server.children()
    child.kill()
    server.wait_event("instance crashed")
    crashed = scrape(server)
    assert crashed[("stcs_instance_stops_total", (("reason", "crashed"),))] == 1
    assert crashed[("stcs_instance_starts_total", (("result", "ok"),))] == 2
    requests.get(f"{server.url}/api/v2/heartbeat", timeout=10)  # no token: 401
    assert (
        scrape(server)[("stcs_requests_total", (("method", "GET"), ("status_class", "4xx")))] >= 1
    )
    names = {name for name, _ in crashed}
    assert not any("user" in label for _, labels in crashed for label, _ in labels)
    assert {
        "stcs_queue_length",
        "stcs_queue_wait_seconds_count",
        "stcs_queue_timeouts_total",
        "stcs_auth_lookups_total",
    } <= names


async def test_admin_stop_waits_for_the_request_in_flight(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    token = new_token()
    client_for(server, token).heartbeat()
    [child] = server.children()
    async with aiohttp.ClientSession() as session:
        launched = time.monotonic()
        long = asyncio.ensure_future(slow_create(session, server, token, "long-one", 2.0))
        await until_in_flight(session, server, token)
        async with session.delete(f"{server.url}/admin/instances/{token}", headers=HDR) as resp:
            took = time.monotonic() - launched
            assert resp.status == 200 and (await resp.json())["stopped"] is True
        assert long.done() and (await long).status == 200  # it finished first
        assert took >= 1.9  # the stop waited for the upload, whose body takes 2 s to send
        wait_gone(child.pid, 5)
        async with session.delete(f"{server.url}/admin/instances/{token}", headers=HDR) as resp:
            assert resp.status == 404  # nothing runs for that user now
    assert [e["reason"] for e in server.events("instance stopped")] == ["admin"]
    names = [c.name for c in client_for(server, token).list_collections()]  # starts again
    assert names == ["long-one"]


async def test_held_user_waits_instead_of_failing(stcs: Callable[..., StcsServer]) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    token = new_token()
    headers = {"X-Chroma-Token": token}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{server.url}/admin/users/{token}/hold", headers=HDR) as r:
            assert r.status == 200
        waiting = asyncio.ensure_future(
            session.get(f"{server.url}/api/v2/heartbeat", headers=headers)
        )
        await asyncio.sleep(0.5)
        assert not waiting.done()
        assert server.children() == []
        async with session.delete(f"{server.url}/admin/users/{token}/hold", headers=HDR) as r:
            assert r.status == 200
        resp = await asyncio.wait_for(waiting, 10)
        assert resp.status == 200


def test_blocked_user_gets_403_until_unblocked(stcs: Callable[..., StcsServer]) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    token = new_token()
    client_for(server, token).heartbeat()
    [child] = server.children()
    resp = requests.post(f"{server.url}/admin/users/{token}/block", headers=HDR, timeout=30)
    assert resp.status_code == 200
    wait_gone(child.pid, 5)  # blocking also stops the user's chroma
    refused = requests.get(
        f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": token}, timeout=10
    )
    assert refused.status_code == 403 and refused.json()["error"] == "AuthorizationError"
    listed = requests.get(f"{server.url}/admin/instances", headers=HDR, timeout=10).json()
    assert listed["blocked"] == [token]
    assert json.loads((server.db / ".stcs" / "blocked.json").read_text()) == [token]
    requests.delete(f"{server.url}/admin/users/{token}/block", headers=HDR, timeout=10)
    client_for(server, token).heartbeat()


def test_status_lists_exactly_the_running_instances(stcs: Callable[..., StcsServer]) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    done = cli("status", server=server)
    assert done.returncode == 0 and "no instances running" in done.stdout
    tokens = sorted(new_token() for _ in range(2))
    for token in tokens:
        client_for(server, token).heartbeat()
    done = cli("status", server=server)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["USER", "PID", "PORT"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(rows) == tokens
    pids = {str(c.pid) for c in server.children()}
    assert {row[1] for row in rows.values()} == pids
    requests.delete(f"{server.url}/admin/instances/{tokens[0]}", headers=HDR, timeout=30)
    after = cli("status", server=server).stdout.splitlines()[1:]
    assert [line.split()[0] for line in after] == [tokens[1]]
    wrong = subprocess.run(
        [
            sys.executable,
            "-m",
            "stcs",
            "status",
            "--port",
            str(server.port),
            "--adminAPIKey",
            "nope",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert wrong.returncode == 1 and "403" in wrong.stderr


@pytest.mark.slow
def test_backup_while_others_work_then_restore_gives_the_same_answers(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    owner = new_token()
    rng = random.Random(5)
    dim = 128
    vecs = [[rng.random() for _ in range(dim)] for _ in range(5000)]
    col = client_for(server, owner).create_collection("kept")
    col.add(ids=[f"v{i}" for i in range(5000)], embeddings=vecs)
    probe = [[rng.random() for _ in range(dim)]]
    expected = col.query(query_embeddings=probe, n_results=10)

    others_ok, others_failed = [], []
    stop = threading.Event()

    def other_user(token: str) -> None:
        c = client_for(server, token).get_or_create_collection("busy")
        n = 0
        while not stop.is_set():
            try:
                c.add(ids=[f"x{n}"], embeddings=[[0.5] * dim])
                others_ok.append(n)
            except Exception as exc:  # recorded; the test asserts there are none
                others_failed.append(repr(exc))
            n += 1

    workers = [threading.Thread(target=other_user, args=(new_token(),)) for _ in range(2)]
    for w in workers:
        w.start()
    archive = tmp_path / "owner.tar.gz"
    done = cli("backup", owner, str(archive), "--no-progress", server=server)
    stop.set()
    for w in workers:
        w.join(30)
    assert done.returncode == 0, done.stderr
    assert "backed up" in done.stdout and archive.stat().st_size > 1_000_000
    assert others_failed == [] and len(others_ok) > 0
    assert col.count() == 5000  # the owner works again after the hold

    fresh = tmp_path / "fresh-db"
    done = cli("restore", owner, str(archive), "--no-progress", db=fresh)  # no server: offline
    assert done.returncode == 0, done.stderr
    restored = stcs(db=fresh)
    again = client_for(restored, owner).get_collection("kept")
    got = again.query(query_embeddings=probe, n_results=10)
    assert got["ids"] == expected["ids"]
    assert got["distances"][0] == pytest.approx(expected["distances"][0], rel=1e-6)

    # Restoring onto a user that has data needs --force, and changes nothing without it.
    target = server.db / owner
    before = sorted((p.relative_to(target), p.stat().st_mtime_ns) for p in target.rglob("*"))
    refused = cli("restore", owner, str(archive), "--no-progress", server=server)
    assert refused.returncode == 1 and "--force" in refused.stderr
    after = sorted((p.relative_to(target), p.stat().st_mtime_ns) for p in target.rglob("*"))
    assert after == before
    forced = cli("restore", owner, str(archive), "--no-progress", "--force", server=server)
    assert forced.returncode == 0, forced.stderr
    assert client_for(server, owner).get_collection("kept").count() == 5000


def test_backup_refuses_bad_input_and_changes_nothing(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    assert cli("backup", "nobody-here", str(tmp_path / "x.tar.gz"), server=server).returncode == 1
    assert cli("backup", "../etc", str(tmp_path / "x.tar.gz"), server=server).returncode == 1
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(b"not a tarball")
    done = cli("restore", "someone", str(bogus), server=server)
    assert done.returncode == 1 and "cannot read" in done.stderr
    assert user_dirs(server.db) == []


def test_sighup_reopens_the_log_file(stcs: Callable[..., StcsServer], tmp_path: Path) -> None:
    log_file = tmp_path / "stcs.log"
    server = stcs("--logFile", str(log_file))
    rotated = tmp_path / "stcs.log.1"
    log_file.rename(rotated)  # what logrotate does
    os.kill(server.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not log_file.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    requests.get(f"{server.url}/health", timeout=10)
    server.stop()
    events = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
    assert events[0] == "log file reopened" and "request" in events
    assert "log file reopened" not in rotated.read_text()


def test_child_output_is_bounded_and_shown_in_admin(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    logs = tmp_path / "child-logs"
    server = stcs(
        "--adminAPIKey",
        ADMIN,
        "--childLogDir",
        str(logs),
        "--childLogMaxBytes",
        "4096",
        env={"RUST_LOG": "info"},
    )  # chroma logs every request at info
    token = new_token()
    client = client_for(server, token)
    for _ in range(40):
        client.heartbeat()
        client.list_collections()
    log_file = logs / f"{log_mod.user_ref(token)}.log"  # UUID mode: named by reference
    rotated = log_file.with_name(log_file.name + ".1")
    deadline = time.monotonic() + 10  # checked every second (LOG_ROTATE_S)
    while not rotated.exists() or log_file.stat().st_size > 4096 + 8192:
        assert time.monotonic() < deadline, log_file.stat().st_size
        time.sleep(0.1)
    entry = requests.get(f"{server.url}/admin/instances", headers=HDR, timeout=10).json()
    assert entry["instances"][0]["logFile"] == str(log_file)
    assert log_file.with_name(log_file.name + ".1").exists()
    assert log_file.stat().st_size <= 4096 + 8192  # cut back at the last tick, then a little
    assert b"\x00" not in log_file.read_bytes()  # no hole from the child's old offset


def test_timestamp_is_structlog_iso_format() -> None:
    """The request line's own stamper writes what structlog's ISO stamper writes."""
    ours = log_mod._timestamp(None, "info", {})["timestamp"]
    reference = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "info", {})
    theirs = reference["timestamp"]
    assert len(ours) == len(theirs) == len("2026-11-21T14:51:04.573126Z")
    assert ours.endswith("Z") and theirs.endswith("Z")
    parsed = datetime.fromisoformat(ours.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None
    assert abs((datetime.now(timezone.utc) - parsed).total_seconds()) < 1


async def test_block_while_a_request_outlasts_the_drain_is_not_500(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    token = new_token()
    client_for(server, token).heartbeat()
    async with aiohttp.ClientSession() as session:
        long = asyncio.ensure_future(slow_create(session, server, token, "long-one", 3.0))
        await until_in_flight(session, server, token)
        url = f"{server.url}/admin/users/{token}/block?drainTimeout=0.5"
        async with session.post(url, headers=HDR) as resp:
            assert resp.status == 200, await resp.text()
            body = await resp.json()
        assert body["blocked"] is True and body["stopped"] is False
        assert (await long).status == 200  # the request in flight finished
        async with session.get(
            f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": token}
        ) as resp:
            assert resp.status == 403  # and the block holds
