"""Bounded soak of a real `stcs serve`: users, random adds and queries, children killed at random.

    .venv/bin/python scripts/soak.py [--users 8] [--sessions 6] [--max-instances 3] ...

Each user (a thread with the unmodified chromadb.HttpClient) runs sessions of a few requests
back to back (adds of 10 new ids, or top-3 queries), then idles 0.3-1.5 s so TTL reaping and
eviction happen. A killer SIGKILLs a random chroma child every ``--kill-interval`` seconds.
At the end stcs is stopped with SIGTERM, every process under the data directory is counted,
stcs is restarted on the same data and every acknowledged id is looked up.

It prints, and exits 1 unless all are zero:
  lost   acknowledged ids missing after the restart
  left   chroma processes still running after stcs stopped
  5xx    server errors on requests during which no child of that user was killed
Bounded by --time-limit (s); every process it starts is stopped by pid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import chromadb
import httpx
import psutil
import requests
from chromadb.config import Settings
from chromadb.errors import ChromaError, InternalError, RateLimitError

DIM = 32
KILL_GRACE_S = 0.3  # a kill this long before a request started may still fail it (see below)


@dataclass
class Outcome:
    user: str
    op: str
    started: float
    ended: float
    error: str | None = None
    server_error: bool = False


@dataclass
class Soak:
    args: argparse.Namespace
    db: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    acked: dict[str, list[str]] = field(default_factory=dict)
    kills: list[tuple[str, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    # -- server ------------------------------------------------------------------------------

    def start_server(self, log_name: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        log = open(self.db.parent / log_name, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stcs",
                "serve",
                "--port",
                str(self.port),
                "--db",
                str(self.db),
                "--ttl",
                str(self.args.ttl),
                "--dbMaxInstances",
                str(self.args.max_instances),
                "--queueTimeout",
                "60000",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "ANONYMIZED_TELEMETRY": "False"},
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"stcs did not start; see {self.db.parent / log_name}")
            time.sleep(0.05)

    def stop_server(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str) -> chromadb.api.ClientAPI:
        return chromadb.HttpClient(
            host="127.0.0.1",
            port=self.port,
            headers={"X-Chroma-Token": token},
            settings=Settings(anonymized_telemetry=False),
        )

    # -- load --------------------------------------------------------------------------------

    def record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def call(self, user: str, op: str, fn: object) -> bool:
        started = time.monotonic()
        try:
            fn()  # type: ignore[operator]
        except (InternalError, RateLimitError, httpx.TransportError) as exc:
            self.record(Outcome(user, op, started, time.monotonic(), type(exc).__name__, True))
            return False
        except ChromaError as exc:
            self.record(Outcome(user, op, started, time.monotonic(), type(exc).__name__))
            return False
        self.record(Outcome(user, op, started, time.monotonic()))
        return True

    def user_loop(self, token: str, seed: int) -> None:
        rng = random.Random(seed)
        client = self.client(token)
        collection: list[object] = []

        def open_collection() -> None:
            collection[:] = [client.get_or_create_collection("soak")]

        while not collection and not self.stop.is_set():
            self.call(token, "open", open_collection)
        counter = 0
        for _session in range(self.args.sessions):
            for _ in range(rng.randint(2, 6)):
                if self.stop.is_set():
                    return
                col = collection[0]
                if rng.random() < 0.6:
                    ids = [f"{token[:8]}-{counter}-{i}" for i in range(10)]
                    counter += 1
                    vecs = [[rng.random() for _ in range(DIM)] for _ in ids]
                    if self.call(
                        token, "add", lambda c=col, i=ids, v=vecs: c.add(ids=i, embeddings=v)
                    ):
                        with self.lock:
                            self.acked[token].extend(ids)
                else:
                    query = [[rng.random() for _ in range(DIM)]]
                    self.call(
                        token,
                        "query",
                        lambda c=col, q=query: c.query(query_embeddings=q, n_results=3),
                    )
            time.sleep(rng.uniform(0.3, 1.5))

    def killer(self, seed: int) -> None:
        rng = random.Random(seed)
        assert self.proc is not None
        while not self.stop.wait(rng.uniform(0.5, 1.5) * self.args.kill_interval):
            try:
                kids = psutil.Process(self.proc.pid).children()
            except psutil.NoSuchProcess:
                return
            if not kids:
                continue
            victim = rng.choice(kids)
            try:
                cmd = victim.cmdline()
                # Children get ``--path .`` in their data directory: resolve against the cwd.
                user = (Path(victim.cwd()) / cmd[cmd.index("--path") + 1]).resolve().name
                victim.send_signal(signal.SIGKILL)
            except (psutil.Error, ValueError, IndexError):
                continue
            with self.lock:
                self.kills.append((user, time.monotonic()))

    # -- verdict -----------------------------------------------------------------------------

    def excused(self, outcome: Outcome) -> bool:
        """A server error is excused when a child of that user was killed while the request
        was in flight (or just before it: the supervisor learns of a death through SIGCHLD, a
        few ms after it; a request reusing a keep-alive connection in that window fails)."""
        return any(
            user == outcome.user and outcome.started - KILL_GRACE_S <= t <= outcome.ended
            for user, t in self.kills
        )

    def run(self) -> dict[str, object]:
        tokens = [
            str(uuid.UUID(int=random.Random(self.args.seed + i).getrandbits(128)))
            for i in range(self.args.users)
        ]
        self.acked = {t: [] for t in tokens}
        self.start_server("stcs-soak.log")
        started = time.monotonic()
        users = [
            threading.Thread(target=self.user_loop, args=(t, self.args.seed + i))
            for i, t in enumerate(tokens)
        ]
        kill_thread = threading.Thread(target=self.killer, args=(self.args.seed,))
        for t in users:
            t.start()
        kill_thread.start()
        deadline = started + self.args.time_limit
        for t in users:
            t.join(max(0.1, deadline - time.monotonic()))
        timed_out = any(t.is_alive() for t in users)
        self.stop.set()
        for t in users:
            t.join(120)
        kill_thread.join(10)
        load_s = time.monotonic() - started

        exit_code = self.stop_server()
        time.sleep(0.5)
        left = [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if any(str(self.db) in a for a in (p.info.get("cmdline") or []))
        ]
        for pid in left:  # the soak stops what it found, by pid, after counting it
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()

        self.start_server("stcs-soak-verify.log")
        lost = 0
        try:
            for token, ids in self.acked.items():
                if not ids:
                    continue
                col = self.client(token).get_collection("soak")
                present = set(col.get(ids=ids, include=[])["ids"])
                lost += len(set(ids) - present)
        finally:
            self.stop_server()

        server_errors = [o for o in self.outcomes if o.server_error]
        unexcused = [o for o in server_errors if not self.excused(o)]
        log_lines = []
        for line in (self.db.parent / "stcs-soak.log").read_text().splitlines():
            with contextlib.suppress(ValueError):
                log_lines.append(json.loads(line))
        events = Counter(e.get("event") for e in log_lines)
        reasons = Counter(
            e.get("reason") for e in log_lines if e.get("event") == "instance stopped"
        )
        return {
            "users": self.args.users,
            "requests": len(self.outcomes),
            "ok": sum(1 for o in self.outcomes if o.error is None),
            "acked_ids": sum(len(v) for v in self.acked.values()),
            "kills": len(self.kills),
            "instance_starts": events["instance started"],
            "crashes_seen": events["instance crashed"],
            "stops_idle": reasons["idle"],
            "stops_evicted": reasons["evicted"],
            "server_errors_excused": len(server_errors) - len(unexcused),
            "client_errors": sum(1 for o in self.outcomes if o.error and not o.server_error),
            "load_seconds": round(load_s, 1),
            "stcs_exit_code": exit_code,
            "timed_out": timed_out,
            "lost": lost,
            "left": len(left),
            "5xx": len(unexcused),
            "unexcused": [o.__dict__ for o in unexcused[:10]],
        }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--sessions", type=int, default=6, help="sessions per user")
    parser.add_argument("--max-instances", type=int, default=3)
    parser.add_argument("--ttl", type=int, default=1000, help="dbTTL (ms)")
    parser.add_argument("--kill-interval", type=float, default=1.0, help="seconds, jittered")
    parser.add_argument("--time-limit", type=float, default=240, help="load phase bound (s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stcs-soak-") as tmp:
        figures = Soak(args, Path(tmp) / "db").run()
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        if key != "unexcused":
            print(f"{key:<{width}}  {value}")
    for o in figures["unexcused"]:  # type: ignore[attr-defined]
        print("unexcused:", o)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    bad = figures["lost"] or figures["left"] or figures["5xx"] or figures["timed_out"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
