"""Faults: dead children, a dead supervisor, stale processes, locks, bad clients, shutdown."""

from __future__ import annotations

import asyncio
import fcntl
import json
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import psutil
import pytest
import requests

from tests.harness import (
    ADMIN,
    COLLECTIONS,
    AuthServer,
    StcsServer,
    chroma_pids_under,
    client_for,
    free_port,
    new_token,
    self_signed_cert,
    slow_create,
    stcs_cli,
    until_in_flight,
    user_dirs,
    vectors,
    wait_gone,
)

CHROMA = str(Path(sys.executable).parent / "chroma")


def no_tracebacks(server: StcsServer) -> None:
    text = server.log_path.read_text()
    assert "Traceback" not in text, text[-3000:]
    errors = [e for e in server.log_lines() if e.get("level") in ("error", "critical")]
    assert errors == [], errors


def test_child_killed_between_requests_restarts_with_data_intact(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs()
    token = new_token()
    col = client_for(server, token).create_collection("durable")
    col.add(ids=["a", "b"], embeddings=vectors(2, 1), documents=["one", "two"])
    [child] = server.children()
    child.kill()
    wait_gone(child.pid, 5)
    server.wait_event("instance crashed")
    again = client_for(server, token).get_collection("durable")
    assert sorted(again.get()["ids"]) == ["a", "b"]
    [fresh] = server.children()
    assert fresh.pid != child.pid


def test_kill_9_of_stcs_takes_its_children_down(stcs: Callable[..., StcsServer]) -> None:
    server = stcs()
    for _ in range(3):
        client_for(server, new_token()).heartbeat()
    pids = [c.pid for c in server.children()]
    assert len(pids) == 3
    server.proc.kill()  # SIGKILL: no handler runs, only PR_SET_PDEATHSIG can act
    server.proc.wait(10)
    for pid in pids:
        wait_gone(pid, 10)
    assert chroma_pids_under(server.db) == []


@pytest.mark.slow
def test_stale_chroma_on_a_user_directory_is_stopped_at_startup(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    db = tmp_path / "db"
    token = new_token()
    db.mkdir(mode=0o700)  # stcs serves only a private dbPath
    (db / token).mkdir()
    port = free_port()
    stale = subprocess.Popen(
        [CHROMA, "run", "--path", str(db / token), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"http://localhost:{port}/api/v2/heartbeat", timeout=1)
                break
            except requests.RequestException:
                assert time.monotonic() < deadline and stale.poll() is None
                time.sleep(0.1)
        server = stcs(db=db)
        assert stale.wait(15) is not None  # stopped by stcs at start-up
        [found] = server.events("stopping leftover chroma server")
        assert found["pid"] == stale.pid
        client_for(server, token).create_collection("after-cleanup")
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.wait()


def test_locked_user_directory_is_not_started_twice(stcs: Callable[..., StcsServer]) -> None:
    server = stcs()
    token = new_token()
    locks = server.db / ".stcs" / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{token}.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as another process writing this directory would
        resp = requests.get(
            f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": token}, timeout=10
        )
        assert resp.status_code == 503
        assert resp.json()["error"] == "InternalError"
        assert server.children() == []
    client_for(server, token).heartbeat()  # lock released: it starts
    assert len(server.children()) == 1


@pytest.mark.parametrize(
    "authorization", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Bearer a b", "Token abc"]
)
def test_malformed_authorization_is_401(
    stcs: Callable[..., StcsServer], authorization: str
) -> None:
    server = stcs()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            f"GET /api/v2/heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: "
            f"{authorization}\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "AuthError"
    assert user_dirs(server.db) == []


def test_oversize_headers_are_refused_and_the_server_goes_on(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs()
    resp = requests.get(
        f"{server.url}/api/v2/heartbeat",
        headers={"X-Chroma-Token": new_token(), "X-Big": "x" * 20000},
        timeout=10,
    )
    assert resp.status_code in (400, 431)
    assert user_dirs(server.db) == []
    client_for(server, new_token()).heartbeat()
    no_tracebacks(server)


async def test_client_gone_mid_upload_releases_the_instance(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs("--ttl", "1000", "--adminAPIKey", ADMIN)
    token = new_token()
    client_for(server, token).heartbeat()
    [child] = server.children()
    # Announce 1 MB, send a few bytes, hang up.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            f"POST {COLLECTIONS} HTTP/1.1\r\nHost: x\r\nX-Chroma-Token: {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"
            f'{{"name": "abandoned"'.encode()
        )
        async with aiohttp.ClientSession() as session:
            await until_in_flight(session, server, token)  # hung up mid-upload, lease held
    # in-flight is back to 0: the idle cull stops the child about dbTTL (1 s) later; a leaked
    # lease would keep it until the 30 s bodyTimeout, far past this deadline.
    wait_gone(child.pid, 15)
    assert [e["reason"] for e in server.wait_event("instance stopped")] == ["idle"]
    no_tracebacks(server)


async def test_client_gone_mid_download_releases_the_instance(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs("--ttl", "1000")
    token = new_token()
    col = client_for(server, token).create_collection("large")
    col.add(ids=[str(i) for i in range(2000)], embeddings=vectors(2000, 7))
    [child] = server.children()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        body = b'{"include": ["embeddings"]}'
        sock.sendall(
            f"POST {COLLECTIONS}/{col.id}/get HTTP/1.1\r\nHost: x\r\n"
            f"X-Chroma-Token: {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
    # The rest of the ~8 MB answer is abandoned.  Culled about dbTTL (1 s) later; a leaked
    # lease would keep it until the 30 s sendTimeout, far past this deadline.
    wait_gone(child.pid, 15)
    no_tracebacks(server)


def test_memory_floor_queues_then_503(stcs: Callable[..., StcsServer]) -> None:
    total_mb = psutil.virtual_memory().total // 2**20
    server = stcs("--dbMinFreeMemoryMB", str(total_mb * 2), "--queueTimeout", "1000")
    started = time.monotonic()
    resp = requests.get(
        f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": new_token()}, timeout=10
    )
    assert resp.status_code == 503 and resp.json()["error"] == "RateLimitError"
    assert "Retry-After" in resp.headers
    assert time.monotonic() - started >= 0.9
    assert server.children() == [] and user_dirs(server.db) == []
    [queued] = server.events("start queued")
    assert queued["reason"] == "memory"


async def test_sigterm_lets_in_flight_requests_finish(stcs: Callable[..., StcsServer]) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    token = new_token()
    client_for(server, token).heartbeat()
    [child] = server.children()
    async with aiohttp.ClientSession() as session:
        pending = asyncio.ensure_future(slow_create(session, server, token, "finishing", 2.0))
        await until_in_flight(session, server, token)
        server.proc.send_signal(signal.SIGTERM)
        resp = await pending
        assert resp.status == 200
    assert server.proc.wait(20) == 0
    wait_gone(child.pid, 5)
    assert chroma_pids_under(server.db) == []
    # The write that was in flight at SIGTERM survived the restart.
    again = stcs(db=server.db)
    names = [c.name for c in client_for(again, token).list_collections()]
    assert names == ["finishing"]


def test_secrets_never_reach_logs_or_error_bodies(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    good, bad, down = "tok-good-3141592653", "tok-bad-2718281828", "tok-500-1414213562"
    auth_server.answers[good] = (200, {"userId": "secret-test-user"})
    auth_server.answers[down] = (500, {"error": "x"})
    server = stcs(
        "--auth",
        auth_server.url,
        "--authKey",
        "authkey-6022140857",
        "--adminAPIKey",
        "adminkey-1602176634",
    )
    bodies = []
    client_for(server, good).create_collection("coll-1")
    for token in (bad, down):
        for header in ({"X-Chroma-Token": token}, {"Authorization": f"Bearer {token}"}):
            bodies.append(
                requests.get(f"{server.url}/api/v2/heartbeat", headers=header, timeout=10).text
            )
    bodies.append(
        requests.get(
            f"{server.url}/admin-health", headers={"x-api-key": "adminkey-wrong-000"}, timeout=10
        ).text
    )
    requests.get(
        f"{server.url}/admin-health", headers={"x-api-key": "adminkey-1602176634"}, timeout=10
    )
    server.stop()
    logged = server.log_path.read_text()
    child_logs = "".join(
        p.read_text(errors="replace") for p in (server.db / ".stcs" / "logs").glob("*.log")
    )
    for secret in (
        good,
        bad,
        down,
        "authkey-6022140857",
        "adminkey-1602176634",
        "adminkey-wrong-000",
    ):
        assert secret not in logged
        assert secret not in child_logs
        assert not any(secret in body for body in bodies)
    assert "secret-test-user" in logged  # the user id is logged, as it should be


def test_auth_server_tls_is_verified_against_the_ca_file(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    cert, key = self_signed_cert(tmp_path, "auth")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    auth = AuthServer(ssl_context=context).start()
    try:
        auth.answers["t"] = (200, {"userId": "tls-user"})
        url = auth.url.replace("http://", "https://")
        untrusted = stcs("--auth", url, db=tmp_path / "db1", name="untrusted")
        resp = requests.get(
            f"{untrusted.url}/api/v2/heartbeat", headers={"X-Chroma-Token": "t"}, timeout=10
        )
        assert resp.status_code == 503  # an unverifiable auth server is no answer
        trusted = stcs(
            "--auth", url, "--authServerCAFile", str(cert), db=tmp_path / "db2", name="trusted"
        )
        client_for(trusted, "t").heartbeat()
        assert user_dirs(trusted.db) == ["tls-user"]
    finally:
        auth.stop()


def test_unusable_auth_ca_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    done = stcs_cli(
        "serve",
        "--auth",
        "https://127.0.0.1:1/x",
        "--authServerCAFile",
        str(bad),
        "--db",
        str(tmp_path / "db"),
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "authServerCAFile" in done.stderr
    assert not (tmp_path / "db").exists()


def test_wrong_ca_means_503_not_401(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    # plain-http server addressed as https: the TLS handshake fails -> unavailable, never 401.
    server = stcs("--auth", auth_server.url.replace("http://", "https://"))
    resp = requests.get(
        f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": "t"}, timeout=10
    )
    assert resp.status_code == 503


def test_every_acknowledged_write_survives_sigterm_and_restart(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs()
    token = new_token()
    col = client_for(server, token).create_collection("stream")
    acked: list[str] = []
    failures: list[str] = []

    def writer() -> None:
        for batch in range(10_000):
            ids = [f"b{batch}-{i}" for i in range(100)]
            try:
                col.add(ids=ids, embeddings=vectors(100, batch))
            except Exception as exc:  # the server went away: stop writing
                failures.append(type(exc).__name__)
                return
            acked.extend(ids)

    thread = threading.Thread(target=writer)
    thread.start()
    deadline = time.monotonic() + 30
    while len(acked) < 1000:  # mid-stream: at least 10 batches acknowledged
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.01)
    server.proc.send_signal(signal.SIGTERM)
    thread.join(60)
    assert not thread.is_alive() and failures
    assert server.proc.wait(30) == 0
    restarted = stcs(db=server.db)
    again = client_for(restarted, token).get_collection("stream")
    present = set(again.get(ids=acked, include=[])["ids"])
    assert len(acked) >= 1000
    assert present == set(acked), f"{len(set(acked) - present)} acknowledged ids lost"
