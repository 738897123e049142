"""The test harness shared by the test modules (one place, not imported from other test modules):
a real chromadb client for a server, explicit embeddings, a slow request held in flight, a
process waited out, the echo upstream, the admin key and a metrics scrape, the stcs CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import chromadb
import psutil
import requests
from aiohttp import web
from chromadb.config import Settings
from prometheus_client.parser import text_string_to_metric_families

from stcs.launcher import Child
from stcs.launcher import free_port as free_port  # re-exported: the one free-port probe

ROOT = Path(__file__).resolve().parent.parent


def readme_block(after: str, lang: str) -> str:
    """The first fenced ``lang`` block of README.md after the line containing ``after``: tests
    run the README's snippets as written, so the docs cannot drift from what works."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(after)
    match = re.compile(rf"^```{lang}\n(.*?)^```$", re.MULTILINE | re.DOTALL).search(readme, start)
    assert match, f"no {lang} block after {after!r} in README.md"
    return match.group(1)


def user_dirs(db: Path) -> list[str]:
    """Entries of ``db`` other than stcs's own state directory."""
    return sorted(p.name for p in db.iterdir() if p.name != ".stcs") if db.exists() else []


def chroma_pids_under(db: Path) -> list[int]:
    """Pids of live processes whose ``--path`` (resolved against their working directory:
    stcs gives children ``--path .``) lies under ``db``."""
    root = str(db.resolve())
    pids = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmd = proc.info.get("cmdline") or []
        if proc.info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        if "--path" in cmd:
            i = cmd.index("--path")
            if i + 1 < len(cmd):
                with contextlib.suppress(psutil.Error, OSError):
                    path = os.path.join(proc.cwd(), cmd[i + 1])
                    if os.path.realpath(path).startswith(root):
                        pids.append(proc.info["pid"])
    return pids


@dataclass
class StcsServer:
    """A running ``stcs serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    port: int
    db: Path
    log_path: Path
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[psutil.Process]:
        """Live (non-zombie) chroma children of this server."""
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        alive = []
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                if kid.status() != psutil.STATUS_ZOMBIE:
                    alive.append(kid)
        return alive

    def log_lines(self) -> list[dict[str, Any]]:
        lines = []
        for raw in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(raw))
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("event") == name]

    def wait_event(
        self,
        name: str,
        count: int = 1,
        timeout: float = 10,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Wait until ``name`` was logged at least ``count`` times (only lines ``where``
        accepts, when given); return those lines."""
        deadline = time.monotonic() + timeout
        while len(found := [e for e in self.events(name) if where is None or where(e)]) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name!r} logged {len(found)} times, wanted {count}")
            time.sleep(0.02)
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_stcs(
    tmp_path: Path,
    *args: str,
    db: Path | None = None,
    env: dict[str, str] | None = None,
    wait: bool = True,
    name: str = "stcs",
    ca: Path | None = None,
) -> StcsServer:
    """Start ``stcs serve`` on a free port with ``args``; wait until ``/health`` answers.

    ``ca``: the server serves HTTPS with this (self-signed) certificate; verify against it.
    """
    port = free_port()
    db = db or tmp_path / "db"
    log_path = tmp_path / f"{name}-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("APP_", "DB_", "AUTH_"))}
    full_env.update(env or {})
    out = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stcs", "serve", "--port", str(port), "--db", str(db), *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=full_env,
        cwd=tmp_path,
    )
    out.close()
    server = StcsServer(
        proc=proc, port=port, db=db, log_path=log_path, scheme="https" if ca else "http"
    )
    if not wait:
        return server
    try:  # whatever goes wrong from here on, the process started above is stopped
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"stcs exited {proc.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(requests.RequestException):
                health = requests.get(f"{server.url}/health", timeout=1, verify=str(ca or True))
                if health.status_code == 200:
                    return server
            if time.monotonic() > deadline:
                raise AssertionError(f"stcs not healthy in 20 s:\n{log_path.read_text()}")
            time.sleep(0.05)
    except BaseException:
        server.stop(signal.SIGKILL)
        raise


def new_token() -> str:
    return str(uuid.uuid4())


# -- a real loopback auth server -----------------------------------------------------------


@dataclass
class AuthServer:
    """An aiohttp auth server in a background thread.

    ``answers`` maps a bearer token to ``(status, body)``; unknown tokens get 401.
    ``calls`` counts lookups per token; ``api_keys`` records the ``x-api-key`` seen.
    ``api_key`` set: a lookup with another ``x-api-key`` gets 403, whatever its token.
    """

    answers: dict[str, tuple[int, Any]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    api_keys: list[str | None] = field(default_factory=list)
    delay: float = 0.0
    api_key: str | None = None
    in_flight: int = 0  # lookups being answered now
    max_in_flight: int = 0  # most seen at once
    port: int = 0
    ssl_context: ssl.SSLContext | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _runner: web.AppRunner | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/validate-token"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        self.calls[token] += 1
        self.api_keys.append(request.headers.get("x-api-key"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return web.json_response({"message": "bad api key"}, status=403)
        status, body = self.answers.get(token, (401, {"message": "invalid"}))
        if isinstance(body, (bytes, str)):
            return web.Response(status=status, body=body)
        return web.json_response(body, status=status)

    def start(self) -> AuthServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_get("/validate-token", self._handle)
            self._runner = web.AppRunner(app)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(
                self._runner, "127.0.0.1", self.port or free_port(), ssl_context=self.ssl_context
            )
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None


def self_signed_cert(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (openssl CLI): (cert, key)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


DIM = 384


def client_for(server: StcsServer, token: str | None, transport: str = "x-chroma-token") -> Any:
    """An unmodified chromadb.HttpClient with ``token`` sent by ``transport``."""
    if transport == "bearer":
        settings = Settings(
            chroma_client_auth_provider="chromadb.auth.token_authn.TokenAuthClientProvider",
            chroma_client_auth_credentials=token,
            anonymized_telemetry=False,
        )
        return chromadb.HttpClient(host="127.0.0.1", port=server.port, settings=settings)
    headers = {"X-Chroma-Token": token} if token is not None else {}
    return chromadb.HttpClient(
        host="127.0.0.1",
        port=server.port,
        headers=headers,
        settings=Settings(anonymized_telemetry=False),
    )


def vectors(n: int, seed: int) -> list[Sequence[float]]:
    rng = random.Random(seed)
    return [[rng.random() for _ in range(DIM)] for _ in range(n)]


COLLECTIONS = "/api/v2/tenants/default_tenant/databases/default_database/collections"


async def slow_create(
    session: aiohttp.ClientSession, server: StcsServer, token: str, name: str, seconds: float
) -> aiohttp.ClientResponse:
    """Create a collection with a body trickled over ``seconds``: a request held in flight."""
    head = f'{{"name": "{name}"'.encode()
    # Over the proxy's small-body threshold (64 KiB): streamed to chroma as it arrives, so the
    # request is in flight *at chroma* while it trickles.
    pad_chunks, pad = 10, 8000
    body_len = len(head) + pad_chunks * pad + 1

    async def body() -> AsyncIterator[bytes]:
        yield head
        for _ in range(pad_chunks):
            await asyncio.sleep(seconds / pad_chunks)
            yield b" " * pad
        yield b"}"

    return await session.post(
        f"{server.url}{COLLECTIONS}",
        data=body(),
        headers={
            "X-Chroma-Token": token,
            "Content-Type": "application/json",
            "Content-Length": str(body_len),
        },
    )


async def until_in_flight(
    session: aiohttp.ClientSession, server: StcsServer, user: str, count: int = 1
) -> None:
    """Poll ``/admin/instances`` (the server runs with ``--adminAPIKey ADMIN``) until ``user``'s
    instance holds ``count`` requests in flight: a bounded wait instead of a fixed sleep."""
    deadline = time.monotonic() + 20
    while True:
        async with session.get(f"{server.url}/admin/instances", headers=HDR) as resp:
            listed = await resp.json()
        if any(i["userId"] == user and i["inFlight"] >= count for i in listed["instances"]):
            return
        assert time.monotonic() < deadline, f"never {count} in flight for {user}: {listed}"
        await asyncio.sleep(0.02)


def wait_gone(pid: int, timeout: float) -> float:
    """Seconds until ``pid`` is gone (reaped or zombie); fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"pid {pid} still alive after {timeout} s")
    return time.monotonic() - start


ECHO = Path(__file__).parent / "upstreams" / "echo.py"


ADMIN = "ops-admin-key-7"


HDR = {"x-api-key": ADMIN}


def scrape(server: StcsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = requests.get(
        f"{server.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
    )
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def stcs_cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    check: bool = False,
    stdin_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m stcs ARGS`` as a subprocess, text output captured; ``stdin_text`` is its
    standard input (None: inherited)."""
    return subprocess.run(
        [sys.executable, "-m", "stcs", *args],
        cwd=cwd,
        env=env,
        input=stdin_text,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def cli(
    *args: str, server: StcsServer | None = None, db: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``stcs ARGS`` with the server's settings (port, dbPath, the admin key `ADMIN`)."""
    extra: list[str] = ["--adminAPIKey", ADMIN]
    if server is not None:
        extra += ["--port", str(server.port), "--db", str(server.db)]
    elif db is not None:
        extra += ["--db", str(db)]
    return stcs_cli(*args, *extra, timeout=timeout)


# -- a launcher of tiny real processes, for the supervisor's policy tests ----------------------


class ProcessLauncher:
    """The launcher contract the supervisor uses (`stcs.launcher.ChromaLauncher`: ``launch``,
    ``stop``, ``kill``, ``probe``, ``rotate_log``) over real, tiny processes instead of chroma:
    what the supervisor decides is what is observed.  Subclasses make the process (`spawn`)."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    async def spawn(self, user_id: str) -> asyncio.subprocess.Process:
        raise NotImplementedError

    async def launch(self, user_id: str) -> Child:
        process = await self.spawn(user_id)
        child = Child(
            user_id=user_id,
            port=40000 + len(self.children),
            process=process,
            log_path=Path("/dev/null"),
            started_at=time.time(),
        )
        self.children.append(child)
        return child

    async def stop(self, child: Child) -> int:
        if child.returncode is None:
            child.process.terminate()
        return await child.wait()

    def rotate_log(self, child: Child) -> None:
        pass

    async def probe(self, child: Child, timeout_s: float) -> bool:
        return child.returncode is None

    def kill(self, child: Child) -> None:
        if child.returncode is None:
            child.process.kill()
