"""Reload settings without a restart: SIGHUP (issue 23 item 2)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import chromadb
import pytest
import requests

from stcs.config import SETTINGS
from tests.harness import AuthServer, StcsServer, client_for, free_port, new_token


def test_every_setting_is_classified_reloadable_or_not() -> None:
    assert all(isinstance(info.reloadable, bool) for info in SETTINGS)
    restart_only = {info.key for info in SETTINGS if not info.reloadable}
    assert {"appPort", "dbPath", "logFile", "enableSSL", "chromaCommand"} <= restart_only
    assert {"dbTTL", "logLevel", "authServerAPIKey", "trustedProxies"}.isdisjoint(restart_only)


def _keep_alive_request(sock: socket.socket, token: str) -> bytes:
    sock.sendall(
        f"GET /api/v2/heartbeat HTTP/1.1\r\nHost: x\r\nX-Chroma-Token: {token}\r\n\r\n".encode()
    )
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        assert chunk, "connection closed"
        data += chunk
    return data


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o600)


def test_sighup_applies_live_settings_without_dropping_anything(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    auth = AuthServer().start()
    try:
        token, other = new_token(), new_token()
        auth.answers = {token: (200, {"userId": "alice"}), other: (200, {"userId": "bob"})}
        config = tmp_path / "config.yml"
        base = f"authServerEndpoint: {auth.url}\ndbTTL: 60000\nlogLevel: info\n"
        _write(config, base + "authServerAPIKey: first-key\n")
        server = stcs("--config", str(config))
        client = client_for(server, token)
        client.create_collection("one")
        [child] = server.children()
        keep_alive = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        assert b"200 OK" in _keep_alive_request(keep_alive, token)

        _write(
            config,
            f"authServerEndpoint: {auth.url}\ndbTTL: 1500\nlogLevel: debug\n"
            "authServerAPIKey: second-key-secret\nuserMaxCollections: 1\n",
        )
        os.kill(server.pid, signal.SIGHUP)
        [line] = server.wait_event("settings reloaded")
        assert sorted(line["changed"]) == sorted(
            ["dbTTL", "logLevel", "authServerAPIKey", "userMaxCollections"]
        )
        assert "second-key" not in server.log_path.read_text()
        assert not server.events("settings need a restart")
        # the open keep-alive connection and the child started before are still there
        assert b"200 OK" in _keep_alive_request(keep_alive, token)
        assert [p.pid for p in server.children()] == [child.pid]
        # the quota: alice has one collection, the limit is now one
        with pytest.raises(chromadb.errors.ChromaError):
            client.create_collection("two")
        # the auth key: a new token is looked up with the new key; logLevel debug shows it
        client_for(server, other).heartbeat()
        assert auth.api_keys[-1] == "second-key-secret"
        server.wait_event("token resolved")
        # dbTTL 1.5 s: alice's idle chroma is stopped well before the old 60 s
        keep_alive.close()
        deadline = time.monotonic() + 20
        while any(p.pid == child.pid for p in server.children()):
            assert time.monotonic() < deadline, "dbTTL not applied"
            time.sleep(0.1)
    finally:
        auth.stop()


@contextlib.contextmanager
def _serve_with_config(tmp_path: Path, config: Path) -> Iterator[StcsServer]:
    """``stcs serve --config`` alone: appPort and dbPath from the file (the harness puts them
    on the command line, which a file cannot override)."""
    log_path = tmp_path / "stcs.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APP_", "DB_", "AUTH_"))}
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stcs", "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    port = int(config.read_text().split("appPort: ")[1].split()[0])
    server = StcsServer(proc=proc, port=port, db=tmp_path / "db", log_path=log_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log_path.read_text()
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{server.url}/health", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        yield server
    finally:
        server.stop()


def test_sighup_keeps_what_needs_a_restart_and_refuses_a_bad_file(tmp_path: Path) -> None:
    port, other_port = free_port(), free_port()
    config = tmp_path / "config.yml"
    _write(config, f"appPort: {port}\ndbPath: {tmp_path / 'db'}\ndbTTL: 60000\n")
    with _serve_with_config(tmp_path, config) as server:
        _write(config, f"appPort: {other_port}\ndbPath: {tmp_path / 'other'}\ndbTTL: 30000\n")
        os.kill(server.pid, signal.SIGHUP)
        [line] = server.wait_event("settings need a restart")
        assert sorted(line["keys"]) == ["appPort", "dbPath"]
        [reloaded] = server.wait_event("settings reloaded")
        assert reloaded["changed"] == ["dbTTL"]
        assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{other_port}/health", timeout=5)
        assert not (tmp_path / "other").exists()

        _write(config, f"appPort: {port}\ndbTTL: [\n")  # not YAML
        os.kill(server.pid, signal.SIGHUP)
        [bad] = server.wait_event("settings not reloaded")
        assert "config.yml" in bad["reason"] and "not valid YAML" in bad["reason"]
        _write(config, f"appPort: {port}\ndbPath: {tmp_path / 'db'}\ndbTTL: 0\n")  # too small
        os.kill(server.pid, signal.SIGHUP)
        bad = server.wait_event("settings not reloaded", count=2)[1]
        assert "dbTTL" in bad["reason"]
        assert len(server.events("settings reloaded")) == 1  # nothing applied since
        assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
        client_for(server, new_token()).heartbeat()
