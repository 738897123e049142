"""stcs against direct chroma, measured in the same run; prints a markdown table and writes it
to docs/benchmarks.md (with the machine description).  Bounded: about 5 minutes.

    scripts/bench [--duration 5] [--rounds 3] [--only SECTION] [--out docs/benchmarks.md]

1. Throughput, p50 and p99 at concurrency 8 and 1 (wrk), ``GET /api/v2/heartbeat`` and a top-10
   query on a 10,000 x 384 collection: the *same* chroma child measured directly (its port),
   through nginx and through stcs, in interleaved rounds, so only the proxy differs; aiohttp's
   server answering a constant as the ceiling of any aiohttp-served proxy.
1b. Instructions per proxied heartbeat (valgrind callgrind): repeatable on a noisy host.
2. Cold start: a never-seen user's first request to its response, p50/p99 over 20 users, with
   the lean launcher and with ``chromaCommand: chroma``.
3. Idle RSS per child, and RSS of stcs itself with 50 idle children.
4. Churn: 200 users, ``dbMaxInstances`` 20, each adds and queries; total time, p99, errors.
5. Auth-server mode: requests/s with the token cache warm vs every request asking the auth
   server (``authCacheTTL`` 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import chromadb
import psutil
import requests
from chromadb.config import Settings

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CHROMA = str(Path(PY).parent / "chroma")
# Every user of the bench comes from 127.0.0.1: addressNewUsersPerMinute (a fair-share bound
# against one client creating users en masse, issue 18) would refuse the cold-start, memory and
# churn sections' never-seen users after the first 10.
ENV = {
    **os.environ,
    "ANONYMIZED_TELEMETRY": "False",
    "RUST_LOG": "warn",
    "ADDRESS_NEW_USERS_PER_MINUTE": "0",
}
ADMIN = "bench-admin"
API = "/api/v2/tenants/default_tenant/databases/default_database/collections"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_http(url: str, timeout: float = 30, verify: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1, verify=verify).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} not up in {timeout} s")


@contextmanager
def serving(
    argv: list[str],
    ready_url: str,
    log: Path | None = None,
    ready_timeout: float = 30,
    verify: bool = True,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run the server ``argv`` (output to ``log``, else discarded) until ``ready_url`` answers
    200 (``verify``: check its TLS certificate); on exit SIGTERM, and SIGKILL after 60 s."""
    # Closed by the `with` below once the child has its own copy of the descriptor.
    sink: contextlib.AbstractContextManager[Any] = (
        open(log, "wb") if log else contextlib.nullcontext(subprocess.DEVNULL)  # noqa: SIM115
    )
    with sink as out:
        proc = subprocess.Popen(argv, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(ready_url, ready_timeout, verify)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def stcs(db: Path, *args: str) -> Iterator[str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [PY, "-m", "stcs", "serve", "--port", str(port), "--db", str(db)]
    argv += ["--adminAPIKey", ADMIN, *args]
    with serving(argv, f"{base}/health", log=db.parent / f"stcs-{port}.log"):
        yield base


def stcs_pid(base: str) -> int:
    port = int(base.rsplit(":", 1)[1])
    for conn in psutil.net_connections("tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return int(conn.pid)
    raise RuntimeError("stcs pid not found")


def child_port(base: str, user: str) -> int:
    body = requests.get(f"{base}/admin/instances", headers={"x-api-key": ADMIN}, timeout=10)
    return int(next(i["port"] for i in body.json()["instances"] if i["userId"] == user))


@dataclass
class Wrk:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(
    url: str,
    seconds: int,
    headers: dict[str, str],
    body: str | None = None,
    connections: int = 8,
    script: str = "",
) -> Wrk:
    """wrk at ``connections`` concurrency (2 threads, or 1 for 1 connection); POST ``body`` as
    JSON when given."""
    args = ["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as lua:
        lua.write(script)
        if body is not None:
            lua.write(
                f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                'wrk.headers["Content-Type"] = "application/json"\n'
            )
    try:
        out = subprocess.run(
            [*args, "-s", lua.name, url],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        ).stdout
    finally:
        os.unlink(lua.name)
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, flags=re.MULTILINE))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (sum(map(int, sock.groups())) if sock else 0)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return Wrk(rps, _ms(lat["50"]), _ms(lat["99"]), errors)


# -- 1. throughput ------------------------------------------------------------------------------

# A constant heartbeat answer from aiohttp's own server: no proxying, no upstream. What any
# aiohttp-served proxy, stcs included, can at most reach on this machine.  On the event loop
# stcs picks by default (uvloop when installed).
AIOHTTP_CONSTANT = textwrap.dedent("""
    import asyncio, sys
    from aiohttp import web
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    BODY = b'{"nanosecond heartbeat":1795272400943336342}'
    async def answer(request):
        return web.Response(body=BODY, content_type="application/json")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(
        app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None, loop=loop
    )
""")

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir};
    proxy_temp_path {dir};
    # 1 MB bodies (the bulk rows) in memory: no temp files, which nginx's workers (nobody)
    # could not write inside the benchmark's private temporary directory.
    client_body_buffer_size 2m;
    proxy_max_temp_file_size 0;
    upstream chroma {{ server 127.0.0.1:{upstream}; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://chroma;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


@contextmanager
def reference_server(argv: list[str], url: str) -> Iterator[str | None]:
    """A reference server (nginx, aiohttp) for the duration; None when it is not installed.
    Its process is in `REFERENCE_PROCS` under its base URL while it serves."""
    if shutil.which(argv[0]) is None:
        yield None
        return
    base = url.rsplit("/api/", 1)[0]
    with serving(argv, url) as proc:
        REFERENCE_PROCS[base] = psutil.Process(proc.pid)
        try:
            yield base
        finally:
            REFERENCE_PROCS.pop(base, None)


# base URL -> the reference server's (master) process, for its CPU per request
REFERENCE_PROCS: dict[str, psutil.Process] = {}


def tree_cpu_s(proc: psutil.Process, children: bool = True) -> float:
    """User + system seconds of ``proc`` and (``children``) its children: nginx's master and
    worker; stcs's own process alone (its children are the chroma instances it proxies to,
    whose CPU is not the proxy's)."""
    total = 0.0
    for p in [proc, *(proc.children(recursive=True) if children else ())]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


@contextmanager
def nginx_in_front(tmp: Path, upstream: int) -> Iterator[str | None]:
    """nginx (1 worker, keep-alive upstream) in front of ``127.0.0.1:upstream``."""
    port, conf_dir = free_port(), tmp / "nginx"
    conf_dir.mkdir(exist_ok=True)
    conf_dir.chmod(0o777)  # temp files of nginx's workers, which run as nobody under root
    conf = conf_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=conf_dir, upstream=upstream, port=port))
    argv = ["nginx", "-c", str(conf), "-p", str(conf_dir)]
    with reference_server(argv, f"http://127.0.0.1:{port}/api/v2/heartbeat") as base:
        yield base


NODE_PACKAGES = ["http-proxy@1", "pino@9", "pidusage@3", "uuid@9"]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.02)
    raise RuntimeError(f"port {port} not listening in {timeout} s")


@contextmanager
def node_reference(tmp: Path, upstream: int, chroma_pid: int) -> Iterator[str | None]:
    """The Node.js server's request path (scripts/reference/node-request-path.js, "orig": as
    the original does it) in front of ``127.0.0.1:upstream``; None without node and npm."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        yield None
        return
    work = tmp / "node"
    work.mkdir(exist_ok=True)
    script = work / "node-request-path.js"
    shutil.copy(ROOT / "scripts" / "reference" / "node-request-path.js", script)
    if not (work / "node_modules").exists():
        subprocess.run(
            ["npm", "install", "--silent", "--no-audit", "--no-fund", *NODE_PACKAGES],
            cwd=work,
            check=True,
            capture_output=True,
            timeout=300,
        )
    port = free_port()
    argv = ["node", str(script), str(port), str(upstream), str(chroma_pid), "orig"]
    proc = subprocess.Popen(argv, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def throughput(tmp: Path, seconds: int, rounds: int) -> list[str]:
    """Each workload: ``rounds`` rounds of direct, nginx, (aiohttp constant,) stcs in turn, so
    a slow stretch of the host hits them alike; medians, and the median of per-round ratios."""
    rows = []
    with stcs(tmp / "tp") as base, contextlib.ExitStack() as refs:
        token = str(uuid.uuid4())
        client = chromadb.HttpClient(
            host="127.0.0.1",
            port=int(base.rsplit(":", 1)[1]),
            headers={"X-Chroma-Token": token},
            settings=Settings(anonymized_telemetry=False),
        )
        col = client.create_collection("bench", metadata={"hnsw:space": "l2"})
        rng = random.Random(1)
        for start in range(0, 10_000, 2_000):
            col.add(
                ids=[str(i) for i in range(start, start + 2_000)],
                embeddings=[[rng.random() for _ in range(384)] for _ in range(2_000)],
            )
        query = json.dumps(
            {
                "query_embeddings": [[rng.random() for _ in range(384)]],
                "n_results": 10,
                "include": ["distances"],
            }
        )
        child = child_port(base, token)
        direct = f"http://127.0.0.1:{child}"
        nginx = refs.enter_context(nginx_in_front(tmp, child))
        chroma_pid = next(
            int(i["pid"])
            for i in requests.get(
                f"{base}/admin/instances", headers={"x-api-key": ADMIN}, timeout=10
            ).json()["instances"]
        )
        node = refs.enter_context(node_reference(tmp, child, chroma_pid))
        port = free_port()
        constant = refs.enter_context(
            reference_server(
                [PY, "-c", AIOHTTP_CONSTANT, str(port)], f"http://127.0.0.1:{port}/api/v2/heartbeat"
            )
        )
        floors = {
            f"floor: {mode}": refs.enter_context(floor_reference(child, mode))
            for mode in FLOOR_MODES
        }
        stcs_proc = psutil.Process(stcs_pid(base))
        auth = {"X-Chroma-Token": token}
        heartbeat, top10 = "/api/v2/heartbeat", f"{API}/{col.id}/query"
        for name, path, body, connections in (
            ("heartbeat", heartbeat, None, 8),
            ("query 10k x 384, top 10", top10, query, 8),
            ("heartbeat, 1 connection", heartbeat, None, 1),
            ("query, 1 connection", top10, query, 1),
        ):
            targets = {"direct": direct, "nginx": nginx, "node": node, "stcs": base}
            if body is None and connections > 1:
                targets["aiohttp"] = constant
            if body is not None and connections > 1:
                targets.update(floors)  # the design's floor, in the same rounds (issue 24)
            urls = {k: f"{v}{path}" for k, v in targets.items() if v}
            procs = {"stcs": stcs_proc}
            for key, url in targets.items():
                if key not in ("direct", "stcs") and url in REFERENCE_PROCS:
                    procs[key] = REFERENCE_PROCS[url]
            runs, cpu_us = interleaved(urls, procs, rounds, seconds, auth, body, connections)
            rows.append(_throughput_row(name, runs, cpu_us))
            print(rows[-1], flush=True)
            if body is not None and connections > 1:
                PACED_ROWS[:] = paced(targets, procs, runs, cpu_us, rounds, seconds, auth)
                for row in PACED_ROWS:
                    print(row, flush=True)
        targets = {"direct": direct, "nginx": nginx, "stcs": base}
        BULK_ROWS[:] = bulk({k: v for k, v in targets.items() if v}, procs, auth, col.id)
        for row in BULK_ROWS:
            print(row, flush=True)
    return rows


PACED_ROWS: list[str] = []


def paced(
    targets: dict[str, str | None],
    procs: dict[str, psutil.Process],
    query_runs: dict[str, list[Wrk]],
    query_cpu: dict[str, list[float]],
    rounds: int,
    seconds: int,
    auth: dict[str, str],
) -> list[str]:
    """The body's own cost (issue 24): heartbeats through each proxy *paced* to the rate the
    query ran at through it (wrk's ``delay``), so that both requests are measured at the same
    rate.  A proxy's CPU per request depends on the rate: at thousands of requests a second one
    wake-up of the event loop serves several requests and the caches stay warm; at a query's
    few hundred each request pays its own wake-ups with cold caches.  Comparing a query with a
    heartbeat at full speed therefore counts that, not the body.  Rows: per proxy, CPU µs per
    paced heartbeat, per query, and the difference."""
    rows = []
    for key in ("stcs", "nginx", *(f"floor: {mode}" for mode in FLOOR_MODES)):
        url = targets.get(key)
        if not url or key not in procs or not query_cpu.get(key):
            continue
        rate = statistics.median(r.rps for r in query_runs[key])
        # Each of the 8 connections waits `delay` ms after each answer (a heartbeat answers in
        # well under a millisecond): 8 connections at the query's rate.
        lua = f"function delay() return {max(1, round(8 * 1000 / rate))} end\n"
        runs, cpu = interleaved(
            {key: f"{url}/api/v2/heartbeat"}, {key: procs[key]}, rounds, seconds, auth, None, 8, lua
        )
        hb = statistics.median(cpu[key])
        query = statistics.median(query_cpu[key])
        got = statistics.median(r.rps for r in runs[key])
        rows.append(
            f"| {key} | {_ratio(query_runs, key)} | {rate:,.0f} / {got:,.0f} | {_cpu(cpu, key)} | "
            f"{_cpu(query_cpu, key)} | **{query - hb:+.0f}** |"
        )
    return rows


BULK_ROWS: list[str] = []
BULK_MB, BULK_REPEAT = 1_000_000, 20  # CPU times tick at 10 ms: enough MB to show nginx


def bulk(
    targets: dict[str, str], procs: dict[str, psutil.Process], auth: dict[str, str], coll: str
) -> list[str]:
    """A 1 MB add (an upsert of one record with a 1 MB document) and a 1 MB get (that record,
    its document included), `BULK_REPEAT` times each, one at a time on a keep-alive
    connection: MB/s, and the proxy's CPU ms per MB (user + system), per target."""
    document = "d" * BULK_MB
    add = json.dumps({"ids": ["bulk"], "embeddings": [[0.5] * 384], "documents": [document]})
    get = json.dumps({"ids": ["bulk"], "include": ["documents"]})
    rows = []
    for name, path, body in (("1 MB add", "upsert", add), ("1 MB get", "get", get)):
        cells = []
        for key, url in targets.items():
            session = requests.Session()
            target = f"{url}{API}/{coll}/{path}"
            headers = {**auth, "Content-Type": "application/json"}
            session.post(target, data=body, headers=headers, timeout=120).raise_for_status()
            proc = procs.get(key)
            tree = key != "stcs"
            before, started, size = tree_cpu_s(proc, tree) if proc else 0.0, time.monotonic(), 0
            for _ in range(BULK_REPEAT):
                answer = session.post(target, data=body, headers=headers, timeout=120)
                answer.raise_for_status()
                size += len(body) + len(answer.content)
            took = time.monotonic() - started
            mb = size / 1e6
            cpu = f"{(tree_cpu_s(proc, tree) - before) / mb * 1e3:.2f}" if proc else "-"
            cells.append(f"{mb / took:.1f} MB/s, {cpu} ms CPU/MB")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def interleaved(
    urls: dict[str, str],
    procs: dict[str, psutil.Process],
    rounds: int,
    seconds: int,
    headers: dict[str, str],
    body: str | None,
    connections: int,
    script: str = "",
) -> tuple[dict[str, list[Wrk]], dict[str, list[float]]]:
    """``rounds`` rounds of wrk on each of ``urls`` in turn (after a 1 s warm-up each): the
    results per key, and for each key of ``procs`` (``"stcs"``, ``"nginx"``) that process
    tree's CPU µs (user + system) per request in its rounds.  ``script``: wrk Lua added to
    each run (a ``delay`` to pace it)."""
    runs: dict[str, list[Wrk]] = {key: [] for key in urls}
    cpu_us: dict[str, list[float]] = {key: [] for key in procs}
    for url in urls.values():
        wrk(url, 1, headers, body, connections, script)  # warm-up
    for _ in range(rounds):
        for key, url in urls.items():
            tree = key != "stcs"
            before = tree_cpu_s(procs[key], tree) if key in procs else 0.0
            result = wrk(url, seconds, headers, body, connections, script)
            runs[key].append(result)
            if key in procs:
                used = tree_cpu_s(procs[key], tree) - before
                cpu_us[key].append(used / (result.rps * seconds) * 1e6)
    return runs, cpu_us


def tls_throughput(tmp: Path, seconds: int, rounds: int) -> list[str]:
    """Heartbeat through stcs serving HTTPS itself (``enableSSL``), against its child direct."""
    if shutil.which("openssl") is None:
        return []
    cert, key = tmp / "tls.crt", tmp / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
         "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    port = free_port()
    argv = [PY, "-m", "stcs", "serve", "--port", str(port), "--db", str(tmp / "tls")]
    argv += ["--adminAPIKey", ADMIN, "--enableSSL", "true"]
    argv += ["--sslCertFile", str(cert), "--sslCertKeyFile", str(key)]
    base = f"https://127.0.0.1:{port}"
    rows = []
    log = tmp / f"stcs-tls-{port}.log"
    with serving(argv, f"{base}/health", log=log, verify=False) as proc:  # self-signed
        token = str(uuid.uuid4())
        auth = {"X-Chroma-Token": token}
        for _ in range(100):
            with contextlib.suppress(requests.RequestException):
                if requests.get(
                    f"{base}/api/v2/heartbeat", headers=auth, verify=False, timeout=5
                ).ok:
                    break
            time.sleep(0.1)
        listing = requests.get(
            f"{base}/admin/instances", headers={"x-api-key": ADMIN}, verify=False, timeout=10
        ).json()["instances"]
        direct = f"http://127.0.0.1:{listing[0]['port']}"
        stcs_proc = psutil.Process(proc.pid)
        for name, connections in (
            ("heartbeat, in-app TLS", 8),
            ("heartbeat, in-app TLS, 1 connection", 1),
        ):
            urls = {k: f"{v}/api/v2/heartbeat" for k, v in (("direct", direct), ("stcs", base))}
            procs = {"stcs": stcs_proc}
            runs, cpu_us = interleaved(urls, procs, rounds, seconds, auth, None, connections)
            rows.append(_throughput_row(name, runs, cpu_us))
            print(rows[-1], flush=True)
    return rows


def _cpu(cpu_us: dict[str, list[float]], key: str) -> str:
    """Median CPU µs per request of ``key``'s rounds, and their spread."""
    values = cpu_us.get(key)
    if not values:
        return "n/a"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def _ratio(runs: dict[str, list[Wrk]], key: str) -> str:
    if key not in runs:
        return "n/a"
    ratios = [r.rps / d.rps for r, d in zip(runs[key], runs["direct"], strict=True)]
    return f"{statistics.median(ratios):.2f}"


def _throughput_row(name: str, runs: dict[str, list[Wrk]], cpu_us: dict[str, list[float]]) -> str:
    def med(key: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs[key])

    errors = sum(
        r.errors for key, results in runs.items() if not key.startswith("floor") for r in results
    )
    spread = ", ".join(f"{r.rps:,.0f}" for r in runs["stcs"])
    return (
        f"| {name} | {med('direct', 'rps'):,.0f} | {med('stcs', 'rps'):,.0f} ({spread}) | "
        f"**{_ratio(runs, 'stcs')}** | {_ratio(runs, 'nginx')} | {_ratio(runs, 'node')} | "
        f"{_ratio(runs, 'aiohttp')} | "
        f"{med('direct', 'p50_ms'):.2f} / {med('direct', 'p99_ms'):.2f} | "
        f"{med('stcs', 'p50_ms'):.2f} / {med('stcs', 'p99_ms'):.2f} | "
        f"{med('stcs', 'p50_ms') - med('direct', 'p50_ms'):+.2f} | "
        f"{_cpu(cpu_us, 'stcs')} | {_cpu(cpu_us, 'nginx')} | {errors} |"
    )


# -- 1b. instructions per request (callgrind) ---------------------------------------------------

CALLGRIND_CLIENT = 300  # requests counted, after 50 uncounted ones


def _instructions(
    argv: list[str],
    url: str,
    ready_url: str,
    headers: dict[str, str],
    workdir: Path,
    body: str | None = None,
    prepare: Any = None,
) -> float:
    """Instructions the server process ``argv`` executes per request to ``url`` (``GET``, or
    ``POST body`` when given; keep-alive, one at a time), counted by valgrind's callgrind:
    repeatable whatever else the host is doing.  ``prepare(session)`` runs once, uncounted."""
    out = workdir / f"callgrind-{free_port()}.out"
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv]
    with serving(valgrind, ready_url, ready_timeout=300) as proc:
        session = requests.Session()
        if prepare is not None:
            url = prepare(session) or url
        method = "POST" if body is not None else "GET"
        for _ in range(50):
            session.request(method, url, headers=headers, data=body, timeout=60).raise_for_status()
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        for _ in range(CALLGRIND_CLIENT):
            session.request(method, url, headers=headers, data=body, timeout=60).raise_for_status()
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
    dumped = Path(f"{out}.1").read_text()
    total = re.search(r"^(?:summary|totals): (\d+)", dumped, flags=re.MULTILINE)
    assert total is not None, "no totals in the callgrind dump"
    return int(total.group(1)) / CALLGRIND_CLIENT


def _query_collection(base: str, headers: dict[str, str]) -> Any:
    """``prepare`` for `_instructions`: a 1,000 x 384 collection; returns its query URL."""

    def prepare(session: requests.Session) -> str:
        created = session.post(
            f"{base}{API}", json={"name": "callgrind"}, headers=headers, timeout=600
        )
        created.raise_for_status()
        coll = created.json()["id"]
        rng = random.Random(2)
        add = {
            "ids": [str(i) for i in range(1000)],
            "embeddings": [[rng.random() for _ in range(384)] for _ in range(1000)],
        }
        session.post(f"{base}{API}/{coll}/add", json=add, headers=headers, timeout=600)
        return f"{base}{API}/{coll}/query"

    return prepare


def instructions(tmp: Path) -> list[str]:
    if shutil.which("valgrind") is None:
        print("valgrind not installed: skipped", flush=True)
        return []
    token = str(uuid.uuid4())
    rows = []
    port = free_port()
    stcs_argv = [PY, "-m", "stcs", "serve", "--port", str(port), "--db", str(tmp / "cg")]
    url = f"http://127.0.0.1:{port}/api/v2/heartbeat"
    health = f"http://127.0.0.1:{port}/health"
    proxied = _instructions(stcs_argv, url, health, {"X-Chroma-Token": token}, tmp)
    rng = random.Random(1)
    query = json.dumps(  # 7.8 KB, the throughput section's query
        {"query_embeddings": [[rng.random() for _ in range(384)]], "n_results": 10,
         "include": ["distances"]}
    )  # fmt: skip
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stcs_argv = [PY, "-m", "stcs", "serve", "--port", str(port), "--db", str(tmp / "cg-q")]
    auth = {"X-Chroma-Token": token, "Content-Type": "application/json"}
    queried = _instructions(
        stcs_argv, base, f"{base}/health", auth, tmp, query, _query_collection(base, auth)
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v2/heartbeat"
    constant = _instructions([PY, "-c", AIOHTTP_CONSTANT, str(port)], url, url, {}, tmp)
    floors = _floor_instructions(tmp, token, query)
    for name, count in (
        ("stcs, proxied heartbeat", proxied),
        (f"stcs, proxied top-10 query ({len(query) / 1000:.1f} KB body)", queried),
        ("query - heartbeat", queried - proxied),
        ("aiohttp answering a constant (no proxying)", constant),
        *floors,
    ):
        rows.append(f"| {name} | {count / 1000:,.0f}k |")
        print(rows[-1], flush=True)
    return rows


FLOOR = ROOT / "scripts" / "reference" / "floor-request-path.py"
# Timed in the throughput section's query row (8 connections) beside stcs and nginx.
FLOOR_MODES = ("essentials", "bare", "pipe")


@contextmanager
def floor_reference(upstream: int, mode: str) -> Iterator[str | None]:
    """scripts/reference/floor-request-path.py in ``mode`` in front of ``127.0.0.1:upstream``
    (a measuring device, not stcs), for the duration."""
    port = free_port()
    argv = [PY, str(FLOOR), str(upstream), str(port), mode]
    with reference_server(argv, f"http://127.0.0.1:{port}/api/v2/heartbeat") as base:
        yield base


def _floor_instructions(tmp: Path, token: str, query: str) -> list[tuple[str, float]]:
    """The floor of a Python relay on this loop (scripts/reference/floor-request-path.py) in
    front of a chroma child of a running stcs: a TCP pipe (heartbeat), and stcs's per-request
    essentials in callbacks (heartbeat and the query)."""
    with stcs(tmp / "floor") as base:
        started = requests.get(f"{base}/api/v2/heartbeat", headers={"X-Chroma-Token": token})
        started.raise_for_status()  # the user's child now runs
        child = child_port(base, token)
        rows = []
        for mode, kind in (
            ("pipe", "heartbeat"),
            ("essentials", "heartbeat"),
            ("essentials", "query"),
        ):
            port = free_port()
            relay = f"http://127.0.0.1:{port}"
            argv = [PY, str(FLOOR), str(child), str(port), mode]
            ready = f"{relay}/api/v2/heartbeat"
            if kind == "heartbeat":
                count = _instructions(argv, ready, ready, {"X-Chroma-Token": token}, tmp)
            else:
                auth = {"X-Chroma-Token": token, "Content-Type": "application/json"}
                count = _instructions(
                    argv, relay, ready, auth, tmp, query, _query_collection(relay, auth)
                )
            rows.append((f"floor: {mode} ({kind}), not stcs", count))
        return rows


# -- 2. cold start --------------------------------------------------------------------------------


def cold_start(tmp: Path, users: int) -> list[str]:
    rows = []
    for name, args in (
        ("lean launcher (default)", ()),
        ("chromaCommand: chroma", ("--chromaCommand", CHROMA)),
    ):
        with stcs(tmp / f"cold-{len(rows)}", "--dbMaxInstances", str(users + 1), *args) as base:
            session = requests.Session()
            session.get(f"{base}/health")
            times = []
            for _ in range(users):
                started = time.perf_counter()
                resp = session.get(
                    f"{base}/api/v2/heartbeat", headers={"X-Chroma-Token": str(uuid.uuid4())}
                )
                times.append((time.perf_counter() - started) * 1000)
                assert resp.status_code == 200, resp.text
            time.sleep(2)
            kids = psutil.Process(stcs_pid(base)).children()
            rss = statistics.median(k.memory_info().rss for k in kids) / 2**20
        rows.append(
            f"| {name} | {statistics.median(times):.0f} | {pct(times, 0.99):.0f} | {rss:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


# -- 3. memory with 50 idle children ---------------------------------------------------------------


def memory(tmp: Path) -> str:
    with stcs(tmp / "mem", "--dbMaxInstances", "60") as base:
        session = requests.Session()
        before = psutil.Process(stcs_pid(base)).memory_info().rss / 2**20
        for _ in range(50):
            session.get(f"{base}/api/v2/heartbeat", headers={"X-Chroma-Token": str(uuid.uuid4())})
        time.sleep(2)
        proc = psutil.Process(stcs_pid(base))
        kids = proc.children()
        child_rss = [k.memory_info().rss / 2**20 for k in kids]
        row = (
            f"| {len(kids)} | {before:.1f} | {proc.memory_info().rss / 2**20:.1f} | "
            f"{statistics.median(child_rss):.1f} | {sum(child_rss) / 1024:.2f} |"
        )
    print(row, flush=True)
    return row


# -- 4. churn -----------------------------------------------------------------------------------


async def _churn(base: str, users: int, concurrency: int) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    errors = 0
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(3)

    async def call(
        session: aiohttp.ClientSession, path: str, body: object, headers: dict[str, str]
    ) -> dict[str, object] | None:
        nonlocal errors
        started = time.perf_counter()
        async with session.post(f"{base}{path}", json=body, headers=headers) as resp:
            answer = await resp.json(content_type=None)
            latencies.append((time.perf_counter() - started) * 1000)
            if resp.status >= 300:
                errors += 1
                return None
            return answer if isinstance(answer, dict) else {}

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        headers = {"X-Chroma-Token": str(uuid.uuid4())}
        vec = [rng.random() for _ in range(64)]
        async with sem:
            try:
                created = await call(session, API, {"name": "churn"}, headers)
                if created is None:
                    return
                coll = created["id"]
                if None is not await call(
                    session,
                    f"{API}/{coll}/add",
                    {"ids": ["a", "b"], "embeddings": [vec, vec[::-1]]},
                    headers,
                ):
                    await call(
                        session,
                        f"{API}/{coll}/query",
                        {"query_embeddings": [vec], "n_results": 2, "include": ["distances"]},
                        headers,
                    )
            except aiohttp.ClientError:
                errors += 1

    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(one(session) for _ in range(users)))
    return time.perf_counter() - started, latencies, errors


def churn(tmp: Path) -> str:
    with stcs(
        tmp / "churn", "--dbMaxInstances", "20", "--ttl", "1000", "--queueTimeout", "120000"
    ) as base:
        total, lat, errors = asyncio.run(_churn(base, 200, 40))
        log = next((tmp / "churn").parent.glob(f"stcs-{base.rsplit(':', 1)[1]}.log"))
        events = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
    starts = sum(1 for e in events if e.get("event") == "instance started")
    evicted = sum(1 for e in events if e.get("reason") == "evicted")
    row = (
        f"| 200 | 20 | {total:.1f} | {statistics.median(lat):.0f} | {pct(lat, 0.99):.0f} | "
        f"{starts} | {evicted} | **{errors}** |"
    )
    print(row, flush=True)
    return row


# -- 5. auth server -----------------------------------------------------------------------------

AUTH_SERVER = textwrap.dedent("""
    import sys
    from aiohttp import web
    async def check(request):
        return web.json_response({"userId": "bench-user"})
    app = web.Application()
    app.router.add_get("/check", check)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
""")


UNIQUE_TOKEN_LUA = """
math.randomseed(os.time() + tonumber(string.sub(tostring({}), 8), 16))
local prefix = tostring(math.random(1, 1000000000))
local n = 0
request = function()
  n = n + 1
  return wrk.format(nil, nil, {["X-Chroma-Token"] = "tok-" .. prefix .. "-" .. n})
end
"""


def auth_mode(tmp: Path, seconds: int) -> list[str]:
    port = free_port()
    server = subprocess.Popen([PY, "-c", AUTH_SERVER, str(port)], env=ENV)
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{port}/check")
        results = {}
        for name, ttl in (("token cache warm", "60000"), ("auth server on every request", "0")):
            with stcs(
                tmp / f"auth-{ttl}",
                "--auth",
                f"http://127.0.0.1:{port}/check",
                "--authCacheTTL",
                ttl,
            ) as base:
                url = f"{base}/api/v2/heartbeat"
                requests.get(url, headers={"X-Chroma-Token": "t"}, timeout=30)
                # Warm: one token, resolved once.  Every request: a new token each time, so
                # neither the cache nor the single-flight sharing of a lookup can help.
                script = UNIQUE_TOKEN_LUA if ttl == "0" else ""
                results[name] = wrk(url, seconds, {"X-Chroma-Token": "t"}, script=script)
        warm = results["token cache warm"].rps
        for name, r in results.items():
            rows.append(
                f"| {name} | {r.rps:,.0f} | {r.p50_ms:.2f} / {r.p99_ms:.2f} | "
                f"{r.rps / warm:.2f} | {r.errors} |"
            )
            print(rows[-1], flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
    return rows


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = psutil.virtual_memory().total / 2**30
    nginx = (
        subprocess.run(["nginx", "-v"], capture_output=True, text=True)
        if shutil.which("nginx")
        else None
    )
    nginx_version = nginx.stderr.strip().split("/")[-1] if nginx else "not installed"
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, {platform.platform()}, "
        f"Python {platform.python_version()} (stcs's event loop: {_default_loop()}), chromadb "
        f"{chromadb.__version__}, aiohttp {aiohttp.__version__}, nginx {nginx_version}"
    )


SECTIONS = ["throughput", "instructions", "cold", "memory", "churn", "auth"]


def _default_loop() -> str:
    """The event loop `stcs serve` runs on with ``eventLoop: auto``."""
    from stcs.cli import _event_loop

    return _event_loop("auto")[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds per throughput workload"
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--only", choices=SECTIONS)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stcs-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        sections: dict[str, list[str]] = {}
        todo = [args.only] if args.only else SECTIONS
        if "throughput" in todo:
            print("## throughput", flush=True)
            sections["throughput"] = throughput(tmp, args.duration, args.rounds)
            sections["throughput"] += tls_throughput(tmp, args.duration, args.rounds)
        if "instructions" in todo:
            print("## instructions per request (callgrind)", flush=True)
            sections["instructions"] = instructions(tmp)
        if "cold" in todo:
            print("## cold start", flush=True)
            sections["cold"] = cold_start(tmp, 20)
        if "memory" in todo:
            print("## memory", flush=True)
            sections["memory"] = [memory(tmp)]
        if "churn" in todo:
            print("## churn", flush=True)
            sections["churn"] = [churn(tmp)]
        if "auth" in todo:
            print("## auth", flush=True)
            sections["auth"] = auth_mode(tmp, args.duration)
    took = time.monotonic() - started
    report = render(sections, took)
    if not args.only:
        write_between_markers(Path(args.out), report)
        print(f"\nwritten to {args.out} ({took:.0f} s)")


BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def write_between_markers(path: Path, report: str) -> None:
    """Replace the text between the markers (the analysis around them is kept)."""
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = f"{text.rstrip()}\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{report}\n{END}{tail}")


def render(sections: dict[str, list[str]], took: float) -> str:
    parts = [
        f"Run of `scripts/bench`, {time.strftime('%Y-%m-%d')}, {took:.0f} s. "
        f"Machine: {machine()}.\n"
    ]
    if "throughput" in sections:
        parts.append(
            "## Throughput and latency (wrk: 8 connections on 2 threads, or 1)\n\nThe same chroma "
            "child, measured directly on its port, through nginx (1 worker, keep-alive "
            "upstream) and through stcs, in interleaved rounds; req/s and latencies are "
            "medians over the rounds (stcs's rounds in brackets), ratios the median of the "
            "per-round ratios to direct. *Node.js* is the request path of the Node.js server stcs "
            "succeeds (scripts/reference/node-request-path.js, as the original does it: "
            "http-proxy without upstream keep-alive, pino lines). *aiohttp* is aiohttp's own "
            "server answering a constant heartbeat. The TLS rows are a second stcs serving "
            "HTTPS itself (`enableSSL`) against its own child. CPU is the proxy's user + system "
            "time per request (median of its rounds, and their range): stcs's process, and "
            "nginx's master and worker, measured the same way in the same run.\n\n"
            "| request | direct req/s | stcs req/s | stcs ratio | nginx ratio | Node.js ratio | "
            "aiohttp ratio | direct p50 / p99 (ms) | stcs p50 / p99 (ms) | added p50 (ms) | "
            "stcs CPU (µs/req) | nginx CPU (µs/req) | errors |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
            + "\n".join(sections["throughput"])
            + "\n"
        )
    if PACED_ROWS:
        parts.append(
            "## The body's own cost, and the design's floor (issue 24)\n\n"
            "The query row above (8 connections) per proxy, against heartbeats paced (wrk "
            "`delay`, 8 connections) to the rate the query ran at through the same proxy, in "
            "the same run: a proxy's CPU per request falls as the rate rises (one event-loop "
            "wake-up serves several requests, caches stay warm), so only requests at one rate "
            "compare what a body costs. The *floor* rows are not stcs but "
            "scripts/reference/floor-request-path.py in front of the same child, timed in the "
            "query row's rounds: *essentials* is what stcs's data plane must do per request "
            "and nothing else, in callbacks (head parsed, token to user, a lease count, head "
            "filtered and sent with the body in one write on a pooled connection, the answer "
            "relayed in one write, stcs's metrics and its structlog request line); *bare* the "
            "same without the metrics and the request line; *pipe* a TCP pipe.\n\n"
            "| proxy | query ratio to direct | query req/s / paced heartbeat req/s | "
            "CPU per paced heartbeat (µs) | CPU per query (µs) | query - heartbeat (µs) |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(PACED_ROWS) + "\n"
        )
    if BULK_ROWS:
        parts.append(
            f"## 1 MB bodies ({BULK_REPEAT} requests one at a time, keep-alive)\n\n"
            "MB/s counts request and response bodies; CPU is the proxy's user + system time "
            "per MB moved.\n\n| request | direct | nginx | stcs |\n|---|---|---|---|\n"
            + "\n".join(BULK_ROWS)
            + "\n"
        )
    if sections.get("instructions"):
        parts.append(
            "## Instructions per request (valgrind callgrind, 300 keep-alive heartbeats one "
            "at a time)\n\nCounted, not timed: the same for the same code whatever the host "
            "is doing, so small changes to the request path show here first. The *floor* rows "
            "are not stcs: scripts/reference/floor-request-path.py in front of the same kind "
            "of child, a TCP pipe and stcs's per-request essentials in callbacks (no task; "
            "the request line through stcs's structlog configuration, stcs's metrics).\n\n"
            "| server | instructions per request |\n|---|---|\n"
            + "\n".join(sections["instructions"])
            + "\n"
        )
    if "cold" in sections:
        parts.append(
            "## Cold start (20 never-seen users, one after another)\n\n"
            "| launcher | first response p50 (ms) | p99 (ms) | idle RSS per child (MB) |\n"
            "|---|---|---|---|\n" + "\n".join(sections["cold"]) + "\n"
        )
    if "memory" in sections:
        parts.append(
            "## Memory with 50 idle children\n\n| children | stcs RSS before (MB) | "
            "stcs RSS with them (MB) | child RSS median (MB) | children total (GiB) |\n"
            "|---|---|---|---|---|\n" + "\n".join(sections["memory"]) + "\n"
        )
    if "churn" in sections:
        parts.append(
            "## Churn (each user: create, add, query; 40 at a time; dbTTL 1 s)\n\n"
            "| users | dbMaxInstances | total (s) | p50 (ms) | p99 (ms) | starts | evictions | "
            "errors |\n|---|---|---|---|---|---|---|---|\n" + "\n".join(sections["churn"]) + "\n"
        )
    if "auth" in sections:
        parts.append(
            "## Auth-server mode (heartbeat through stcs, wrk 8 connections)\n\n"
            "| token resolution | req/s | p50 / p99 (ms) | vs warm cache | errors |\n"
            "|---|---|---|---|---|\n" + "\n".join(sections["auth"]) + "\n"
        )
    return "\n".join(parts)


if __name__ == "__main__":
    main()
