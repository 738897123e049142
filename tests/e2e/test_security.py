"""Secrets and isolation (issue 11): what a local user, a chroma child or a log reader can
learn, and what an admin call means.  Real ``stcs serve`` processes and real chroma children."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import requests

from stcs.launcher import CHILD_ENV_ALLOWED
from stcs.log import user_ref
from tests.harness import ROOT, AuthServer, StcsServer, client_for, new_token, stcs_cli, vectors

ADMIN = "sec-admin-key-Zq81"
AUTH_KEY = "sec-auth-key-Pw33"
HDR = {"x-api-key": ADMIN}


def child_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def files_under(root: Path) -> list[Path]:
    return [root, *sorted(root.rglob("*"))]


def test_child_environment_carries_no_key_and_no_stcs_setting(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs(
        env={
            "ADMIN_API_KEY": ADMIN,
            "AUTH_SERVER_APIKEY": AUTH_KEY,
            "LOG_LEVEL": "info",
            "SOME_OTHER_SECRET": "hunter2",
            "CHROMA_SERVER_CORS_ALLOW_ORIGINS": '["*"]',
            "LC_ALL": "C.UTF-8",
        }
    )
    client_for(server, new_token()).heartbeat()
    [child] = server.children()
    env = child_environ(child.pid)
    allowed = CHILD_ENV_ALLOWED | {"ANONYMIZED_TELEMETRY"}
    assert {k for k in env if not k.startswith("LC_")} <= allowed, env
    assert env["ANONYMIZED_TELEMETRY"] == "False"
    assert env["LC_ALL"] == "C.UTF-8"
    raw = Path(f"/proc/{child.pid}/environ").read_bytes()
    for secret in (ADMIN, AUTH_KEY, "hunter2"):
        assert secret.encode() not in raw


def test_uuid_mode_logs_files_and_command_lines_never_show_the_token(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    """In UUID mode the user id is the token: the log carries its reference instead, child
    log files are named by the reference, and ``ps`` shows no data directory."""
    log_file = tmp_path / "out" / "stcs.log"
    log_file.parent.mkdir()
    server = stcs("--adminAPIKey", ADMIN, "--logFile", str(log_file))
    token = new_token()
    col = client_for(server, token).create_collection("docs")
    col.add(ids=["a"], embeddings=vectors(1, 3))
    [child] = server.children()
    cmdline = Path(f"/proc/{child.pid}/cmdline").read_bytes()
    assert token.encode() not in cmdline
    # Admin calls log the user they act on (the upper-case form means the same user).
    resp = requests.post(f"{server.url}/admin/users/{token.upper()}/block", headers=HDR, timeout=30)
    assert resp.status_code == 200
    resp = requests.get(
        f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": token}, timeout=30
    )
    assert resp.status_code == 403
    server.stop()
    ref = user_ref(token)
    text = log_file.read_text() + server.log_path.read_text()
    assert token not in text and token.upper() not in text
    assert ref in text  # an operator can still follow the user
    logs = server.db / ".stcs" / "logs"
    for path in files_under(logs):
        assert token not in path.name
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert (logs / f"{ref}.log").is_file()
    printed = stcs_cli("user-ref", token.upper(), check=True)
    assert printed.stdout.strip() == ref


def test_auth_server_mode_logs_user_ids_but_never_tokens(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    token = "tok-" + new_token()
    auth_server.answers[token] = (200, {"userId": "alice"})
    server = stcs("--auth", auth_server.url, "--authKey", AUTH_KEY, "--adminAPIKey", ADMIN)
    client_for(server, token).heartbeat()
    server.stop()
    text = server.log_path.read_text()
    assert '"user_id":"alice"' in text
    assert token not in text and AUTH_KEY not in text and ADMIN not in text
    assert (server.db / ".stcs" / "logs" / "alice.log").is_file()


def test_serve_creates_directories_0700_and_files_0600(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    log_file = tmp_path / "stcs-own.log"
    server = stcs("--adminAPIKey", ADMIN, "--logFile", str(log_file))
    token = new_token()
    client_for(server, token).create_collection("docs")
    other = new_token()
    assert requests.post(f"{server.url}/admin/users/{other}/block", headers=HDR).status_code == 200
    server.stop()
    state = server.db / ".stcs"
    checked = [server.db, state, state / "logs", server.db / token, state / "blocked.json"]
    checked += [*(state / "logs").iterdir(), log_file]
    for path in checked:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path}: {oct(mode)}"
    for path in files_under(server.db):  # chroma's own files too (the umask is inherited)
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o007 == 0, f"{path}: {oct(mode)}"
    assert os.stat(server.db).st_mode & 0o777 == 0o700


def test_a_system_error_while_starting_is_503_not_500(stcs: Callable[..., StcsServer]) -> None:
    """An OSError on the start path (here: a file where the user's directory should be) is a
    failed start (503 InternalError), and the server goes on serving other users."""
    server = stcs()
    token = new_token()
    server.db.mkdir(exist_ok=True)
    (server.db / token).write_text("not a directory")
    resp = requests.get(
        f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": token}, timeout=30
    )
    assert resp.status_code == 503
    assert resp.json()["error"] == "InternalError"
    assert "Traceback" not in server.log_path.read_text()
    client_for(server, new_token()).heartbeat()


def sleeper(path: str, cwd: Path) -> subprocess.Popen[bytes]:
    """A process whose command line looks like a chroma child's (``run ... --path PATH``)."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "run", "--path", path],
        cwd=cwd,
    )


def test_orphan_cleanup_touches_only_user_directories_directly_in_db_path(
    tmp_path: Path,
) -> None:
    from stcs.datadir import find_orphans

    db = tmp_path / "db"
    for d in (db / "alice" / "nested", db / ".stcs", tmp_path / "db2" / "bob"):
        d.mkdir(parents=True)
    procs = {
        "direct": sleeper(str(db / "alice"), tmp_path),
        "relative": sleeper(".", db / "alice"),  # as stcs starts them: --path . in the dir
        "db itself": sleeper(str(db), tmp_path),
        "deeper": sleeper(str(db / "alice" / "nested"), tmp_path),
        "sibling prefix": sleeper(str(tmp_path / "db2" / "bob"), tmp_path),
        "state dir": sleeper(str(db / ".stcs"), tmp_path),
        "dotdot": sleeper(str(db / "alice" / ".." / ".."), tmp_path),
    }
    try:
        found = {p.pid for p in find_orphans(db)}
        assert found == {procs["direct"].pid, procs["relative"].pid}
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def test_admin_calls_take_a_uuid_in_any_case_and_auth_refuses_blocked_users(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    token = new_token()
    upper = token.upper()
    client_for(server, token).heartbeat()
    assert len(server.children()) == 1
    resp = requests.delete(f"{server.url}/admin/instances/{upper}", headers=HDR, timeout=30)
    assert resp.json() == {"userId": token, "stopped": True}
    assert not server.children()
    resp = requests.post(f"{server.url}/admin/users/{upper}/hold?ttl=30", headers=HDR, timeout=30)
    assert resp.json()["userId"] == token
    listed = requests.get(f"{server.url}/admin/instances", headers=HDR, timeout=30).json()
    assert listed["held"] == [token]
    requests.delete(f"{server.url}/admin/users/{upper}/hold", headers=HDR, timeout=30)
    auth = requests.get(f"{server.url}/auth", headers={"X-Chroma-Token": token}, timeout=30)
    assert auth.status_code == 204
    requests.post(f"{server.url}/admin/users/{upper}/block", headers=HDR, timeout=30)
    auth = requests.get(f"{server.url}/auth", headers={"X-Chroma-Token": upper}, timeout=30)
    assert auth.status_code == 403 and auth.json()["error"] == "AuthorizationError"


def test_without_auto_create_only_existing_users_are_served_and_nothing_is_created(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    db = tmp_path / "db"
    added = new_token()
    out = stcs_cli("users", "add", added.upper(), "--db", str(db), check=True)
    assert out.stdout.startswith("created")
    assert stat.S_IMODE((db / added).stat().st_mode) == 0o700
    server = stcs("--autoCreateUsers", "false", "--adminAPIKey", ADMIN, db=db)
    for _ in range(50):  # random UUIDs: 401, no directory, no child
        resp = requests.get(
            f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": new_token()}, timeout=30
        )
        assert resp.status_code == 401 and resp.json()["error"] == "AuthError"
    assert sorted(p.name for p in db.iterdir() if p.name != ".stcs") == [added]
    assert not (db / ".stcs" / "logs").exists() or not any((db / ".stcs" / "logs").iterdir())
    assert not server.children()
    client_for(server, added).heartbeat()  # the added user is served
    late = new_token()
    assert requests.get(f"{server.url}/auth", headers={"X-Chroma-Token": late}).status_code == 401
    resp = requests.put(f"{server.url}/admin/users/{late}", headers=HDR, timeout=30)
    assert resp.json() == {"userId": late, "created": True}
    client_for(server, late).heartbeat()
    resp = requests.put(f"{server.url}/admin/users/{late}", headers=HDR, timeout=30)
    assert resp.json() == {"userId": late, "created": False}
    # Removing a user as the README says (hold, delete the directory, release): refused after,
    # and the directory is not made again.
    hold = f"{server.url}/admin/users/{late}/hold"
    assert requests.post(hold, headers=HDR, timeout=30).json()["held"]
    shutil.rmtree(db / late)
    assert requests.delete(hold, headers=HDR, timeout=30).ok
    resp = requests.get(
        f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": late}, timeout=30
    )
    assert resp.status_code == 401 and not (db / late).exists()


async def test_slow_auth_server_lookups_are_bounded_and_never_block_cached_tokens(
    stcs: Callable[..., StcsServer], auth_server: AuthServer
) -> None:
    cached = "tok-cached"
    auth_server.answers[cached] = (200, {"userId": "carol"})
    slow = [f"tok-slow-{i}" for i in range(12)]
    for token in slow:
        auth_server.answers[token] = (200, {"userId": "dave"})
    server = stcs(
        "--auth",
        auth_server.url,
        "--authMaxConcurrentLookups",
        "3",
        "--authMaxLookupsPerAddress",
        "0",  # the flood comes from one address: the global bound is what is tested here
        "--authTimeout",
        "1000",
        "--adminAPIKey",
        ADMIN,
    )

    async with aiohttp.ClientSession() as session:

        async def auth(token: str) -> tuple[int, float]:
            started = time.monotonic()
            async with session.get(f"{server.url}/auth", headers={"X-Chroma-Token": token}) as r:
                await r.read()
                return r.status, time.monotonic() - started

        async def get(path: str, headers: dict[str, str]) -> tuple[int, float]:
            started = time.monotonic()
            async with session.get(f"{server.url}{path}", headers=headers) as r:
                await r.read()
                return r.status, time.monotonic() - started

        assert (await auth(cached))[0] == 204  # now cached
        auth_server.delay = 1.5  # slower than authTimeout
        flood = [asyncio.ensure_future(auth(t)) for t in slow]
        deadline = time.monotonic() + 10
        while auth_server.in_flight < 3:  # the flood is waiting on the auth server now
            assert time.monotonic() < deadline, auth_server.in_flight
            await asyncio.sleep(0.01)
        cached_answer = await auth(cached)
        health = await get("/health", {})
        admin = await get("/admin/instances", HDR)
        # Before the first lookup times out (1 s): later the auth server's handlers outlive
        # the connections stcs gave up on, so its own count no longer says what stcs holds.
        peak = auth_server.max_in_flight
        results = await asyncio.gather(*flood)
    # Not queued behind the flood, which would mean waiting ~1 s (its lookups' authTimeout).
    assert cached_answer[0] == 204 and cached_answer[1] < 0.5
    assert health[0] == 200 and health[1] < 0.5
    assert admin[0] == 200 and admin[1] < 0.5
    assert [status for status, _ in results] == [503] * len(slow)
    assert all(seconds < 1.6 for _, seconds in results)  # authTimeout, not 12 x 1.5 s
    assert peak == 3


# An interpreter another user can run (the venv's lives under /root): the system's.
NOBODY_PYTHON = shutil.which("python3", path="/usr/bin:/bin")
AS_NOBODY = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY_PYTHON is None,
    reason="needs root and a system python3 to run a process as another user",
)

SQUATTER = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen()
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    with conn:
        conn.settimeout(2)
        try:
            print(repr(conn.recv(65536)), flush=True)
            conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\n{}")
        except OSError:
            pass
"""


@AS_NOBODY
def test_a_process_squatting_the_childs_port_never_gets_a_request(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    """Another local user's process that binds the port stcs chose for a child (between stcs's
    check that it is free and the child's bind) and answers the heartbeat is not taken for the
    child: readiness also requires the port's listener to be of stcs's (or the child's) uid."""
    report = tmp_path / "port"
    squatters: list[subprocess.Popen[str]] = []
    stop = threading.Event()

    def squat() -> None:  # as uid 65534 ("nobody"), once the child's port is known
        while not report.exists() or not report.read_text():
            if stop.wait(0.01):
                return
        squatters.append(
            subprocess.Popen(
                [str(NOBODY_PYTHON), "-c", SQUATTER, report.read_text()],
                stdout=subprocess.PIPE,
                text=True,
                user=65534,
            )
        )

    watcher = threading.Thread(target=squat, daemon=True)
    watcher.start()
    server = stcs(
        "--chromaCommand",
        f"{sys.executable} {ROOT / 'tests' / 'upstreams' / 'portless.py'} {report}",
        "--dbStartTimeout",
        "3000",
        "--dbMaxRetries",
        "0",
    )
    try:
        resp = requests.post(
            f"{server.url}/api/v2/tenants/default_tenant/databases/default_database/collections",
            headers={"X-Chroma-Token": new_token()},
            json={"name": "private-notes"},
            timeout=30,
        )
    finally:
        stop.set()
        watcher.join(5)
        for proc in squatters:
            proc.kill()
    seen = squatters[0].communicate(timeout=10)[0] if squatters else ""
    assert resp.status_code == 503, resp.text
    assert "heartbeat" in seen, f"the squatter was never probed (no race set up): {seen!r}"
    assert "private-notes" not in seen, seen
    assert server.events("instance port answered by another process")


@AS_NOBODY
def test_the_kernel_names_the_uid_listening_on_a_port() -> None:
    """`sockdiag.listener_uids`: listeners only (a connection on the port is not one), with
    their owner's uid, as the kernel reports them."""
    from stcs.sockdiag import listener_uids

    with socket.socket() as mine:
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        port = mine.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            assert listener_uids(port) == [0]
    other = subprocess.Popen(
        [str(NOBODY_PYTHON), "-c", SQUATTER, str(port)],
        stdout=subprocess.PIPE,
        text=True,
        user=65534,
    )
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "listening"
        assert listener_uids(port) == [65534]
    finally:
        other.kill()
        other.wait(10)
    assert listener_uids(port) == []
    # Only listeners a connection to 127.0.0.1 reaches, with ``reaching``.
    with socket.socket() as beside, socket.socket() as everywhere:
        beside.bind(("127.0.0.2", port))
        beside.listen()
        assert listener_uids(port) == [0] and listener_uids(port, reaching="127.0.0.1") == []
        beside.close()
        everywhere.bind(("0.0.0.0", port))
        everywhere.listen()
        assert listener_uids(port, reaching="127.0.0.1") == [0]
