"""Cold start and idle RSS, through stcs, for each launcher; direct chroma in the same run.

Prints a markdown table.  Bounded: N users per launcher (default 10), a few seconds each.

    .venv/bin/python scripts/bench_coldstart.py [--users 10]

* first response: wall time of a never-seen user's first request (``GET /api/v2/heartbeat``)
  through stcs, i.e. token check + spawn + readiness + proxying.
* direct spawn: ``chroma run`` started by hand, time to its first good heartbeat (no stcs).
* idle RSS: resident set size of each child 2 s after its last request (psutil; the child and
  any process below it).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import requests

PY = sys.executable
CHROMA = str(Path(PY).parent / "chroma")
ENV = {**os.environ, "ANONYMIZED_TELEMETRY": "False", "RUST_LOG": "warn"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def tree_rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs) / 2**20


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{url} not up in {timeout} s")


def through_stcs(users: int, chroma_command: str) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        args = [
            PY,
            "-m",
            "stcs",
            "serve",
            "--port",
            str(port),
            "--db",
            f"{tmp}/db",
            "--logLevel",
            "warn",
            "--dbMaxInstances",
            str(users + 1),
        ]
        if chroma_command:
            args += ["--chromaCommand", chroma_command]
        server = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(f"{base}/health")
            session = requests.Session()
            session.get(f"{base}/health")  # warm the connection
            firsts = []
            for _ in range(users):
                token = str(uuid.uuid4())
                started = time.perf_counter()
                resp = session.get(f"{base}/api/v2/heartbeat", headers={"X-Chroma-Token": token})
                firsts.append((time.perf_counter() - started) * 1000)
                assert resp.status_code == 200, resp.text
            time.sleep(2)
            kids = psutil.Process(server.pid).children()
            rss = [tree_rss_mb(k.pid) for k in kids]
            return firsts, rss
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)


def direct(users: int, command: list[str]) -> tuple[list[float], list[float]]:
    times, rss = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(users):
            port = free_port()
            started = time.perf_counter()
            proc = subprocess.Popen(
                [
                    *command,
                    "run",
                    "--host",
                    "127.0.0.1",
                    "--path",
                    f"{tmp}/{i}",
                    "--port",
                    str(port),
                ],
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_http(f"http://127.0.0.1:{port}/api/v2/heartbeat")
                times.append((time.perf_counter() - started) * 1000)
                time.sleep(1)
                rss.append(tree_rss_mb(proc.pid))
            finally:
                proc.terminate()
                proc.wait(10)
    return times, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=10)
    args = parser.parse_args()
    lean_cmd = [
        PY,
        "-c",
        "import chromadb_rust_bindings as r, sys; r.cli(['chroma', *sys.argv[1:]])",
    ]
    rows = [
        ("stcs, lean launcher (default)", *through_stcs(args.users, "")),
        ("stcs, chromaCommand: chroma", *through_stcs(args.users, CHROMA)),
        ("direct: lean (python -c, Rust CLI)", *direct(args.users, lean_cmd)),
        ("direct: `chroma` console script", *direct(args.users, [CHROMA])),
    ]
    print(f"\n{args.users} never-seen users each; cpu: {os.cpu_count()} cores\n")
    print("| how | first response p50 (ms) | p90 (ms) | max (ms) | idle RSS median (MB) |")
    print("|---|---|---|---|---|")
    for name, times, rss in rows:
        print(
            f"| {name} | {statistics.median(times):.0f} | {pct(times, 0.9):.0f} | "
            f"{max(times):.0f} | {statistics.median(rss):.1f} |"
        )


if __name__ == "__main__":
    main()
