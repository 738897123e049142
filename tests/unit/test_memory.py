"""The container's memory limit (`stcs.memory.ContainerMemory`) from fake cgroup files in a
temporary directory, and this process's real cgroup.  A tenant's memory limit on real chroma
children is in tests/e2e/test_memory.py."""

from __future__ import annotations

from pathlib import Path

import psutil

from stcs.memory import ContainerMemory

MB = 2**20


def fake_cgroup(tmp_path: Path, proc_lines: str, files: dict[str, str]) -> ContainerMemory:
    """A cgroup root under ``tmp_path`` holding ``files`` (path -> content) and a
    /proc/self/cgroup of ``proc_lines``."""
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(proc_lines)
    return ContainerMemory(root=root, self_cgroup=proc)


def test_cgroup_v2_limit_bounds_what_is_available(tmp_path: Path) -> None:
    mem = fake_cgroup(
        tmp_path,
        "0::/system.slice/stcs.service\n",
        {
            "cgroup.controllers": "cpu memory\n",
            "system.slice/memory.max": "max\n",
            "system.slice/stcs.service/memory.max": f"{1024 * MB}\n",
            "system.slice/stcs.service/memory.current": f"{700 * MB}\n",
            "system.slice/stcs.service/memory.stat": f"anon 1\ninactive_file {100 * MB}\n",
        },
    )
    assert mem.limit() == 1024 * MB
    # limit - (usage - reclaimable page cache) = 1024 - (700 - 100)
    assert mem.cgroup_available() == 424 * MB
    assert mem.available() == min(424 * MB, psutil.virtual_memory().available)


def test_cgroup_v2_the_tightest_ancestor_wins_and_max_is_no_limit(tmp_path: Path) -> None:
    mem = fake_cgroup(
        tmp_path,
        "0::/a/b\n",
        {
            "cgroup.controllers": "memory\n",
            "a/memory.max": f"{512 * MB}\n",
            "a/memory.current": f"{500 * MB}\n",
            "a/memory.stat": "inactive_file 0\n",
            "a/b/memory.max": "max\n",
            "a/b/memory.current": f"{10 * MB}\n",
        },
    )
    assert mem.limit() == 512 * MB and mem.cgroup_available() == 12 * MB
    unlimited = fake_cgroup(
        tmp_path / "u", "0::/\n", {"cgroup.controllers": "memory\n", "memory.max": "max\n"}
    )
    assert unlimited.limit() is None and unlimited.cgroup_available() is None
    assert unlimited.available() <= psutil.virtual_memory().total


def test_cgroup_v1_limit_and_unlimited(tmp_path: Path) -> None:
    lines = "4:memory:/docker/abc\n3:cpu:/docker/abc\n0::/\n"
    mem = fake_cgroup(
        tmp_path,
        lines,
        {
            "memory/docker/abc/memory.limit_in_bytes": f"{2048 * MB}\n",
            "memory/docker/abc/memory.usage_in_bytes": f"{1500 * MB}\n",
            "memory/docker/abc/memory.stat": f"cache 5\ntotal_inactive_file {200 * MB}\n",
        },
    )
    assert mem.limit() == 2048 * MB and mem.cgroup_available() == 748 * MB
    # A container whose cgroup is mounted at the memory root (no /docker/abc below it).
    inside = fake_cgroup(
        tmp_path / "in",
        lines,
        {
            "memory/memory.limit_in_bytes": f"{256 * MB}\n",
            "memory/memory.usage_in_bytes": f"{300 * MB}\n",
        },
    )
    assert inside.limit() == 256 * MB and inside.cgroup_available() == 0
    unlimited = fake_cgroup(
        tmp_path / "v1u",
        lines,
        {"memory/docker/abc/memory.limit_in_bytes": "9223372036854771712\n"},
    )
    assert unlimited.limit() is None


def test_no_cgroup_files_means_the_host_figure(tmp_path: Path) -> None:
    mem = ContainerMemory(root=tmp_path / "none", self_cgroup=tmp_path / "missing")
    assert mem.limit() is None and mem.cgroup_available() is None
    assert 0 < mem.available() <= psutil.virtual_memory().total


def test_the_real_cgroup_of_this_process_reads() -> None:
    """This host's own files (cgroup v1 or v2, limited or not) read without error, and what
    is available is never more than the host has."""
    mem = ContainerMemory()
    limit = mem.limit()
    vm = psutil.virtual_memory()
    available = mem.available()
    assert 0 <= available <= vm.total
    if limit is None:
        assert mem.cgroup_available() is None
        assert abs(available - psutil.virtual_memory().available) < 512 * MB
    else:
        assert 0 <= (mem.cgroup_available() or 0) <= limit
    print(f"cgroup limit: {limit}, available {available / MB:.0f} MB of {vm.total / MB:.0f} MB")
