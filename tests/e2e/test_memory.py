"""A tenant's memory is bounded (``userMaxMemoryMB``, `stcs.memory`): a real `stcs serve`, real
chroma children grown by the unmodified client, real processes for the process-tree figures, and
fake cgroup files in a temporary directory for the container's limit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import chromadb.errors
import numpy as np
import psutil
import pytest
import requests

from stcs.errors import MemoryLimitError
from stcs.launcher import Child
from stcs.memory import MemoryWatch, ProcessTable, pss_bytes
from stcs.snapshot import Phase
from stcs.supervisor import Supervisor
from tests.harness import ADMIN, HDR, ProcessLauncher, StcsServer, client_for, new_token, scrape
from tests.tally import Tally

MB = 2**20
DIM = 2048  # the attack's vectors: 8 KiB each as float32 in chroma's index


def grow(client: object, seconds: float, batch: int = 250) -> tuple[int, Exception | None]:
    """Add batches of random ``DIM``-dimensional vectors to one collection for at most
    ``seconds``; return (records added, the error that ended it or None)."""
    coll = client.get_or_create_collection("big")  # type: ignore[attr-defined]
    rng = np.random.default_rng(7)
    added = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        embeddings = rng.random((batch, DIM), dtype=np.float32)
        try:
            coll.add(ids=[f"r{added + i}" for i in range(batch)], embeddings=embeddings)
        except Exception as exc:  # what the tenant's client raises is the point of the test
            return added, exc
        added += batch
    return added, None


class Victim:
    """Another tenant served throughout: a heartbeat and a one-record add every 50 ms from a
    thread; keeps every failure and the slowest answer (s)."""

    def __init__(self, server: StcsServer) -> None:
        self.client = client_for(server, new_token())
        self.coll = self.client.get_or_create_collection("small")
        self.failures: list[str] = []
        self.served = 0
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.client.heartbeat()
                self.coll.add(ids=[f"v{i}"], embeddings=[[0.1, 0.2, 0.3]])
                self.served += 1
            except Exception as exc:
                self.failures.append(repr(exc))
            self.slowest = max(self.slowest, time.monotonic() - started)
            i += 1
            self._stop.wait(0.05)

    def __enter__(self) -> Victim:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_tenant_over_its_memory_limit_is_stopped_and_told_while_others_are_served(
    stcs: Callable[..., StcsServer],
) -> None:
    """The attack: one tenant adds 2048-dimensional vectors until its chroma holds hundreds of
    MB (716 MB on the issue's host; no limit stopped it).  With ``userMaxMemoryMB 64`` (an idle
    child's PSS is ~16-25 MB here) its chroma is stopped with reason ``memory``, its client
    raises ``QuotaError`` naming the limit (then again at once: the crash-loop back-off), and
    another tenant is answered throughout."""
    server = stcs(
        "--userMaxMemoryMB", "64", "--userMemoryCheckInterval", "250", "--adminAPIKey", ADMIN
    )
    attacker = new_token()
    with Victim(server) as victim:
        attacker_client = client_for(server, attacker)
        added, error = grow(attacker_client, seconds=60)
        # The same back-off as a crash loop: the next request is refused at once, named.
        with pytest.raises(chromadb.errors.QuotaError, match="userMaxMemoryMB is 64 MB"):
            attacker_client.heartbeat()
        stopped = server.wait_event(
            "instance stopped", where=lambda e: e.get("reason") == "memory", timeout=10
        )
        over = server.wait_event("instance over memory limit")[0]
        time.sleep(0.5)  # the victim keeps going while the attacker is backed off
    print(
        f"attacker: {added} records of {DIM} dims before {type(error).__name__}; "
        f"stopped at pss {over['pss_mb']} MB (rss {over['rss_mb']} MB), limit 64 MB; "
        f"victim: {victim.served} rounds, slowest {victim.slowest * 1000:.0f} ms"
    )
    assert isinstance(error, chromadb.errors.QuotaError), repr(error)
    assert "userMaxMemoryMB is 64 MB" in str(error)
    assert len(stopped) == 1, stopped
    assert over["pss_mb"] >= 64 and over["rss_mb"] >= over["pss_mb"], over
    assert victim.failures == [] and victim.served > 10, (victim.failures, victim.served)
    backoff = server.events("start backing off")
    assert backoff and backoff[0]["reason"] == "memory"
    metrics = scrape(server)
    assert metrics[("stcs_instance_stops_total", (("reason", "memory"),))] == 1
    # After the back-off the tenant is served again (its data is on disk; memory is idle again).
    time.sleep(1.5)
    assert client_for(server, attacker).heartbeat()


def instances(server: StcsServer) -> list[dict[str, object]]:
    resp = requests.get(f"{server.url}/admin/instances", headers=HDR, timeout=10)
    assert resp.status_code == 200, resp.text
    listed: list[dict[str, object]] = resp.json()["instances"]
    return listed


def test_a_per_user_override_limits_that_user_only(stcs: Callable[..., StcsServer]) -> None:
    """``PUT /admin/users/{id}/limits {"userMaxMemoryMB": 1}`` (below any chroma's PSS): that
    user's running instance is stopped at the next sample, the other user's is untouched."""
    server = stcs("--adminAPIKey", ADMIN, "--userMemoryCheckInterval", "200")
    limited, other = new_token(), new_token()
    client_for(server, limited).heartbeat()
    other_client = client_for(server, other)
    other_client.heartbeat()
    pids = {i["userId"]: i["pid"] for i in instances(server)}
    resp = requests.put(
        f"{server.url}/admin/users/{limited}/limits",
        json={"userMaxMemoryMB": 1},
        headers=HDR,
        timeout=10,
    )
    assert resp.status_code == 200 and resp.json()["limits"]["userMaxMemoryMB"] == 1
    server.wait_event("instance stopped", where=lambda e: e.get("reason") == "memory")
    # Refused while it backs off (on a slow machine the 1 s may pass first: then it starts,
    # is stopped again at the next sample and backs off 2 s; bounded either way).
    deadline = time.monotonic() + 15
    with pytest.raises(chromadb.errors.QuotaError, match="userMaxMemoryMB is 1 MB"):
        while time.monotonic() < deadline:
            client_for(server, limited).heartbeat()
            time.sleep(0.1)
    assert other_client.heartbeat()
    assert len(server.events("instance over memory limit")) >= 1
    assert {i["userId"]: i["pid"] for i in instances(server)} == {other: pids[other]}


def test_admin_health_counts_instances_by_pss_not_rss(stcs: Callable[..., StcsServer]) -> None:
    """memKb is the proportional set size of the instance's process tree: every child maps
    the same chroma library, which RSS counts once per child."""
    server = stcs("--adminAPIKey", ADMIN)
    for _ in range(2):
        client_for(server, new_token()).heartbeat()
    body = requests.get(f"{server.url}/admin-health", headers=HDR, timeout=10).json()
    rss_kb = {c.pid: c.memory_info().rss / 1000 for c in server.children()}
    for inst in body["instances"]:
        assert 1000 < inst["memKb"] < rss_kb[inst["pid"]], (inst, rss_kb)
    memory = body["memory"]
    assert memory["kbInstanceUse"] == sum(i["memKb"] for i in body["instances"])
    assert memory["kbInstanceAverage"] == round(memory["kbInstanceUse"] / 2)
    assert memory["nMaxInstancesEstimate"] >= 2
    listed = requests.get(f"{server.url}/admin/instances", headers=HDR, timeout=10).json()
    assert all(1000 < i["memKb"] < rss_kb[i["pid"]] for i in listed["instances"])


# -- the policy, fast: real processes holding memory, an injected clock ------------------------

HOG = "import sys, time; b = bytearray(int(sys.argv[1]) * 2**20); print('ready', flush=True); "
HOG += "time.sleep(3600)"


class HogLauncher(ProcessLauncher):
    """Starts, per user, a Python process holding ``mb[user]`` MB (a real process, no chroma).
    A stop moves the injected clock on by ``stop_s`` (a chroma finishing its requests in
    flight after SIGTERM) before it terminates the process."""

    def __init__(self, mb: dict[str, int], clock: list[float], stop_s: float) -> None:
        super().__init__()
        self.mb = mb
        self.clock = clock
        self.stop_s = stop_s

    async def spawn(self, user_id: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", HOG, str(self.mb[user_id]), stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None and await process.stdout.readline() == b"ready\n"
        return process

    async def stop(self, child: Child) -> int:
        self.clock[0] += self.stop_s
        return await super().stop(child)


async def test_the_watch_stops_only_the_instance_over_its_limit_and_backs_it_off() -> None:
    """One sample: the user holding 60 MB under a 40 MB limit is stopped (reason memory), the
    one holding 5 MB under no limit is untouched; the hog's requests get MemoryLimitError
    naming the limit until the back-off, counted from the end of a slow (5 s) stop, is over."""
    clock = [1000.0]
    launcher = HogLauncher({"hog": 60, "small": 5}, clock, stop_s=5.0)
    sup = Supervisor(
        launcher,
        ttl_ms=600000,
        max_instances=5,
        queue_timeout_ms=1000,
        clock=lambda: clock[0],
        recorder=(tally := Tally()),
    )
    watch = MemoryWatch(sup, lambda user: 40 if user == "hog" else 0, interval_ms=100)
    try:
        for user in ("hog", "small"):
            async with sup.acquire(user):
                pass
        small_pid = sup.registry["small"].child.pid  # type: ignore[union-attr]
        (over,) = await watch.sample()
        assert over.user_id == "hog" and over.pss > 40 * MB and over.rss >= over.pss
        await asyncio.wait_for(sup.registry["hog"].stopped.wait(), 10)
        with pytest.raises(MemoryLimitError, match="userMaxMemoryMB is 40 MB") as refused:
            async with sup.acquire("hog"):
                pass
        assert refused.value.retry_after_s == 1  # 1 s from the end of the stop, not its start
        assert tally["instance_stop", "memory"] == 1
        assert sup.registry["small"].phase is Phase.READY
        assert sup.registry["small"].child.pid == small_pid  # type: ignore[union-attr]
        assert not sup.stop_for_memory("small", small_pid + 1, 99 * MB, 99 * MB, 1)  # stale pid
        clock[0] += 1.1
        async with sup.acquire("hog"):  # the back-off is over: it starts again
            pass
    finally:
        await sup.close()


# -- the process tree (real processes, no chroma) ----------------------------------------------

GRANDPARENT = """
import subprocess, sys, time
kid = subprocess.Popen([sys.executable, "-c",
    "import sys, time; b = bytearray(48 * 2**20); sys.stdout.write('ready\\\\n'); "
    "sys.stdout.flush(); time.sleep(60)"], stdout=sys.stdout)
time.sleep(60)
"""


def test_a_process_tree_is_counted_whole() -> None:
    """PSS of a process and its descendants: a grandchild's 48 MB is the tree's."""
    root = subprocess.Popen([sys.executable, "-c", GRANDPARENT], stdout=subprocess.PIPE)
    try:
        assert root.stdout is not None and root.stdout.readline() == b"ready\n"
        table = ProcessTable.read()
        tree = table.tree(root.pid)
        assert len(tree) == 2 and tree[0] == root.pid
        alone = pss_bytes([root.pid])
        whole = pss_bytes(tree)
        assert alone is not None and whole is not None
        assert whole - alone > 45 * MB
        assert table.rss_of(tree) >= whole  # PSS never exceeds RSS: the cheap pre-filter
        assert pss_bytes([2**22 + 12345]) is None  # no such process
    finally:
        for proc in psutil.Process(root.pid).children(recursive=True):
            proc.kill()
        root.kill()
        root.wait(10)


# -- the container's limit (cgroup files) ------------------------------------------------------
