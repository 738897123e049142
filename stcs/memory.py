"""What memory costs: a tenant's chroma as proportional set size, and what stcs may still use.

* **A tenant's cost** is the PSS (proportional set size, ``/proc/<pid>/smaps_rollup``) of its
  chroma's whole process tree: every child maps the same chroma library (~20 MB), which RSS
  counts once per child and PSS divides among them.  An idle child here: RSS 39 MB, PSS 16-25 MB
  (depending on how many children share the library), private 13-15 MB.  The same figure is
  ``memKb`` in ``/admin-health`` and ``/admin/instances``.
* **`MemoryWatch`** enforces ``userMaxMemoryMB``: every ``userMemoryCheckInterval`` ms, off the
  event loop (a worker thread), one pass over ``/proc/*/stat`` gives every process's parent and
  RSS; PSS never exceeds RSS, so only a tree whose RSS is near or over its user's limit has its
  ``smaps_rollup`` read (the kernel walks the page tables for it: ~0.3 ms for an idle child,
  ~3 ms for a 250 MB one).  A tree over the limit is handed to `Supervisor.stop_for_memory`.
* **What is available** (`ContainerMemory`) is the host's available memory, bounded by stcs's
  own cgroup when it has a memory limit (a container, a systemd unit with ``MemoryMax``): limit
  minus usage, less the reclaimable page cache (``inactive_file``), the tightest of stcs's
  cgroup and its ancestors.  cgroup v2 ``memory.max``/``memory.current``, v1
  ``memory.limit_in_bytes``/``memory.usage_in_bytes``; the cgroup is found in
  ``/proc/self/cgroup``.  ``dbMinFreeMemoryMB`` and ``nMaxInstancesEstimate`` use it.

The watch samples; it is not a kernel limit: a tenant may grow by what it can allocate in one
interval before it is stopped.  docs/security.md describes the stronger design (a cgroup per
child with its own ``memory.max``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import structlog

if TYPE_CHECKING:  # the supervisor imports this module
    from stcs.supervisor import Supervisor

log = structlog.get_logger("stcs.memory")

MB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")
# A tree whose RSS is within this of its limit has its PSS read.  RSS as /proc/<pid>/stat gives
# it may lag the truth by up to 64 pages per thread on kernels before 6.2 (split RSS counters).
RSS_SLACK = 16 * MB
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit number.
V1_UNLIMITED = 2**62


# -- a tenant's cost ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessTable:
    """Every process's children and RSS at one moment, from one pass over ``/proc/*/stat``
    (``children``: pid -> child pids; ``rss``: pid -> bytes).  One pass serves every instance
    of a sample: psutil's ``children(recursive=True)`` scans ``/proc`` once per call (1.4 ms
    with 80 processes here, against 1.2 ms for this whole table)."""

    children: dict[int, list[int]]
    rss: dict[int, int]

    @classmethod
    def read(cls) -> ProcessTable:
        children: dict[int, list[int]] = {}
        rss: dict[int, int] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                data = _read_proc(f"/proc/{name}/stat")
            except OSError:  # gone meanwhile
                continue
            # proc(5): "pid (comm) state ppid ... rss(24th)"; comm may hold spaces and ")".
            fields = data[data.rindex(b")") + 2 :].split()
            pid = int(name)
            children.setdefault(int(fields[1]), []).append(pid)
            rss[pid] = int(fields[21]) * PAGE
        return cls(children, rss)

    def tree(self, pid: int) -> list[int]:
        """``pid`` and its descendants (``pid`` first); empty if it is gone."""
        if pid not in self.rss:
            return []
        out = [pid]
        for p in out:  # grows as it goes: breadth first
            out.extend(self.children.get(p, ()))
        return out

    def rss_of(self, pids: Iterable[int]) -> int:
        """The summed RSS (bytes) of ``pids`` (an upper bound of their PSS)."""
        return sum(self.rss.get(pid, 0) for pid in pids)


def _read_proc(path: str) -> bytes:
    """A small /proc file in one read (``os.open``/``os.read``: a quarter of the CPU of
    ``open().read()``, which matters when a sample reads one per process on the host)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 8192)
    finally:
        os.close(fd)


def _pss_of(pid: int) -> int | None:
    """PSS of one process in bytes (``smaps_rollup``, Linux ≥ 4.14; else psutil's
    ``memory_full_info``, which reads ``smaps``), None if it is gone."""
    try:
        data = _read_proc(f"/proc/{pid}/smaps_rollup")
        at = data.find(b"\nPss:")
        if at < 0:
            return 0  # a kernel thread or a zombie: no memory of its own
        return int(data[at + 5 : data.index(b"kB", at)]) * 1024
    except FileNotFoundError:
        if not psutil.pid_exists(pid):
            return None
    except (ProcessLookupError, PermissionError):
        return None
    try:
        return int(psutil.Process(pid).memory_full_info().pss)
    except psutil.Error:
        return None


def pss_bytes(pids: Sequence[int]) -> int | None:
    """The summed PSS (bytes) of ``pids`` (a process tree, root first), None if the root is
    gone; descendants gone meanwhile count 0."""
    if not pids:
        return None
    root = _pss_of(pids[0])
    if root is None:
        return None
    return root + sum(_pss_of(pid) or 0 for pid in pids[1:])


def tree_pss(roots: Sequence[int]) -> dict[int, int | None]:
    """``{root pid: PSS of its whole tree in bytes, or None if gone}``, one `ProcessTable` for
    all.  Blocking (reads ``/proc``): call it in a thread."""
    table = ProcessTable.read()
    return {pid: pss_bytes(table.tree(pid)) for pid in roots}


# -- what stcs may use -------------------------------------------------------------------------


def _read_int(path: Path) -> int | None:
    """The number in ``path``; None when it is missing, unreadable or ``max`` (no limit)."""
    try:
        text = _read_proc(str(path)).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_value(path: Path, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


@dataclass(frozen=True, slots=True)
class _Cgroup:
    """One cgroup directory and the names of its memory files (v2 or v1)."""

    path: Path
    limit_file: str
    usage_file: str
    inactive_key: str  # the reclaimable page cache in memory.stat


class ContainerMemory:
    """The memory stcs may use: the host's available memory, bounded by the memory limit of
    stcs's own cgroup and its ancestors (a container's, a systemd unit's ``MemoryMax``).

    ``root`` is where the cgroup file systems are mounted (``/sys/fs/cgroup``), ``self_cgroup``
    the process's membership (``/proc/self/cgroup``): both injectable, so tests point them at
    fake files.  The cgroups are found once; their files are read at each call (a limit may be
    changed at run time: ``docker update``, ``systemctl set-property``).  Bytes throughout.
    """

    def __init__(
        self,
        root: Path = Path("/sys/fs/cgroup"),
        self_cgroup: Path = Path("/proc/self/cgroup"),
        host_available: Callable[[], int] = lambda: int(psutil.virtual_memory().available),
    ) -> None:
        self._host_available = host_available
        self._cgroups = _find_cgroups(root, self_cgroup)

    def limit(self) -> int | None:
        """The tightest memory limit over stcs's cgroup and its ancestors; None: none."""
        limits = [lim for cg in self._cgroups if (lim := self._limit(cg)) is not None]
        return min(limits, default=None)

    def cgroup_available(self) -> int | None:
        """``min over limited cgroups of limit - (usage - inactive_file)``, at least 0; None
        when no cgroup limits memory."""
        room = None
        for cg in self._cgroups:
            limit = self._limit(cg)
            if limit is None:
                continue
            usage = _read_int(cg.path / cg.usage_file) or 0
            working_set = max(0, usage - _stat_value(cg.path / "memory.stat", cg.inactive_key))
            free = max(0, limit - working_set)
            room = free if room is None else min(room, free)
        return room

    def available(self) -> int:
        """``min(host available, cgroup_available())`` in bytes: what a new instance may use."""
        host = self._host_available()
        room = self.cgroup_available()
        return host if room is None else min(host, room)

    @staticmethod
    def _limit(cg: _Cgroup) -> int | None:
        value = _read_int(cg.path / cg.limit_file)
        return None if value is None or value >= V1_UNLIMITED else value


def _find_cgroups(root: Path, self_cgroup: Path) -> list[_Cgroup]:
    """stcs's memory cgroup and its ancestors up to the mount, from ``self_cgroup``'s lines
    (cgroups(7): ``hierarchy-ID:controllers:path``; v2 is ``0::path``).  Prefers the v1 memory
    controller when one is mounted (a hybrid host keeps memory there), else v2."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return []
    v1_path = v2_path = None
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if "memory" in controllers.split(","):
            v1_path = path
        elif line.startswith("0::"):
            v2_path = path
    if v1_path is not None and (root / "memory").is_dir():
        mount, path = root / "memory", v1_path
        names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    elif v2_path is not None and (root / "cgroup.controllers").exists():
        mount, path = root, v2_path
        names = ("memory.max", "memory.current", "inactive_file")
    else:
        return []
    own = mount / path.lstrip("/")
    if not own.is_dir():  # a container whose own cgroup is mounted at the root
        own = mount
    chain = [own, *own.parents]
    chain = chain[: chain.index(mount) + 1]  # up to the mount, not beyond
    return [_Cgroup(d, *names) for d in chain if (d / names[0]).exists()]


@functools.cache
def system_memory() -> ContainerMemory:
    """This process's `ContainerMemory` (the real ``/sys/fs/cgroup``), made once."""
    return ContainerMemory()


def available_memory() -> int:
    """Bytes of memory available to a new instance: the host's, bounded by stcs's cgroup."""
    return system_memory().available()


# -- enforcing userMaxMemoryMB -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Over:
    """A process tree over its user's limit: ``pss`` and ``rss`` in bytes, ``limit_mb``."""

    user_id: str
    pid: int
    pss: int
    rss: int
    limit_mb: int


def find_over(watched: Sequence[tuple[str, int, int]]) -> tuple[list[Over], int]:
    """Which of ``watched`` (user id, root pid, limit in MB) use more than their limit, as PSS
    of the whole tree; and how many ``smaps_rollup`` files it read.  Blocking: a thread."""
    table = ProcessTable.read()
    over = []
    reads = 0
    for user_id, pid, limit_mb in watched:
        tree = table.tree(pid)
        rss = table.rss_of(tree)
        limit = limit_mb * MB
        if not tree or rss + RSS_SLACK <= limit:
            continue  # PSS <= RSS: under the limit without reading smaps
        reads += len(tree)
        pss = pss_bytes(tree)
        if pss is not None and pss > limit:
            over.append(Over(user_id, pid, pss, rss, limit_mb))
    return over, reads


class MemoryWatch:
    """Stops every instance whose process tree uses more than its user's ``userMaxMemoryMB``
    (PSS), sampled every ``interval_ms`` in a worker thread (`find_over`), through
    `Supervisor.stop_for_memory` (reason ``memory``, the crash-loop back-off, `MemoryLimitError`
    for the user's requests).  ``limit_mb(user_id)`` gives a user's limit (0: none); with no
    running instance limited a tick reads nothing.  Call `start` in the loop, `close` at the
    end (before the supervisor's)."""

    def __init__(
        self, supervisor: Supervisor, limit_mb: Callable[[str], int], interval_ms: int
    ) -> None:
        self._supervisor = supervisor
        self._limit_mb = limit_mb
        self.interval = interval_ms / 1000
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="stcs-memory")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        structlog.contextvars.clear_contextvars()
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sample()
            except Exception:
                log.exception("memory sample failed")

    async def sample(self) -> list[Over]:
        """One sample: find the trees over their limit and stop them.  Returns them."""
        watched = [
            (user_id, pid, limit)
            for user_id, pid in self._supervisor.ready_pids()
            if (limit := self._limit_mb(user_id))
        ]
        if not watched:
            return []
        started = time.perf_counter()
        over, reads = await asyncio.to_thread(find_over, watched)
        log.debug(
            "memory sampled",
            instances=len(watched),
            pss_reads=reads,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        for o in over:
            self._supervisor.stop_for_memory(o.user_id, o.pid, o.pss, o.rss, o.limit_mb)
        return over
