"""Shared fixtures: a real ``stcs serve`` subprocess, a real loopback auth server.

Nothing is mocked: servers listen on 127.0.0.1, children are real chroma servers, and every
process a test starts is stopped by pid in its teardown.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness import AuthServer, StcsServer, start_stcs

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

LAYERS = ("unit", "e2e", "deploy")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its layer, the folder it lives in: ``unit`` (in-process, no stcs or
    chroma process), ``e2e`` (real ``stcs serve`` and chroma children), ``deploy`` (nginx,
    Apache, systemd, the cluster, a fresh clone).  ``scripts/test -m unit`` runs the fast layer."""
    for item in items:
        layer = Path(str(item.path)).parent.name
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture(autouse=True)
def _isolated_working_directory(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test runs in an empty working directory: a ``config.yml`` in the checkout (the
    README suggests one there) or in the caller's directory never reaches a test."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture
def stcs(tmp_path: Path) -> Iterator[Any]:
    """Factory: ``stcs(*args, **kw)`` starts a server; all are stopped (SIGTERM) afterwards,
    and the test fails if any chroma child outlives its server."""
    servers: list[StcsServer] = []

    def factory(*args: str, **kw: Any) -> StcsServer:
        server = start_stcs(tmp_path, *args, **kw)
        servers.append(server)
        return server

    yield factory
    leftovers = []
    for server in servers:
        pids = [p.pid for p in server.children()]
        server.stop()
        _gone, alive = psutil.wait_procs(
            [psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=10
        )
        for proc in alive:
            leftovers.append(proc.pid)
            proc.kill()
    assert not leftovers, f"chroma children outlived stcs: {leftovers}"


@pytest.fixture
def auth_server() -> Iterator[AuthServer]:
    server = AuthServer().start()
    yield server
    server.stop()
