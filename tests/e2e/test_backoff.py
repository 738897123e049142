"""Failures do not repeat at full cost: a user whose chroma cannot start, or crashes right after
starting, backs off (1 s doubling to 60 s) instead of costing spawns on every request."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import requests

from stcs.holds import BACKOFF_STABLE_S
from tests.harness import ADMIN, StcsServer, new_token, scrape


def test_corrupt_database_costs_one_start_series_per_back_off_window(
    stcs: Callable[..., StcsServer],
) -> None:
    server = stcs("--adminAPIKey", ADMIN)
    token = new_token()
    server.db.mkdir(exist_ok=True)
    (server.db / token).mkdir()
    (server.db / token / "chroma.sqlite3").write_bytes(b"\x5a" * 65536)
    statuses: list[int] = []
    retry_after: list[str] = []
    started = time.monotonic()
    while time.monotonic() - started < 4.0:
        resp = requests.get(
            f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": token}, timeout=30
        )
        statuses.append(resp.status_code)
        if "Retry-After" in resp.headers:
            retry_after.append(resp.headers["Retry-After"])
        time.sleep(0.02)
    spawns = len(server.events("instance exited before ready"))
    assert set(statuses) == {503}
    # Series at t = 0, 1 s and 3 s (back-offs of 1 s and 2 s), each 1 + dbMaxRetries spawns.
    assert spawns <= 3 * 3, spawns
    # Enough requests that, each starting a series without the back-off, they would cost far
    # more than 9 spawns; all but the (at most 3) series' first ones are back-off refusals.
    assert len(statuses) > 10 and len(retry_after) >= len(statuses) - 3
    assert len(server.events("start backing off")) == spawns // 3
    metrics = scrape(server)
    assert metrics[("stcs_start_backoffs_total", ())] == spawns // 3
    assert metrics[("stcs_backoff_refusals_total", ())] >= len(statuses) - 3


CRASHER = """\
import http.server, sys, threading, os
port = int(sys.argv[sys.argv.index("--port") + 1])

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *a):
        pass

threading.Timer(0.3, lambda: os._exit(3)).start()  # dies right after becoming ready
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def test_a_child_dying_right_after_readiness_is_not_respawned_on_every_request(
    stcs: Callable[..., StcsServer], tmp_path: Path
) -> None:
    script = tmp_path / "crasher.py"
    script.write_text(CRASHER)
    server = stcs("--chromaCommand", f"{sys.executable} {script}")
    token = new_token()
    requests_sent = 0
    started = time.monotonic()
    while time.monotonic() - started < 4.0:
        requests.get(
            f"{server.url}/api/v2/heartbeat", headers={"X-Chroma-Token": token}, timeout=30
        )
        requests_sent += 1
        time.sleep(0.05)
    starts = len(server.events("instance started"))
    # Crashes at ~0.3 s, 1.6 s, 3.9 s after back-offs of 1 s and 2 s: at most 3 starts in 4 s.
    assert starts <= 3, starts
    assert requests_sent > 20  # often enough that, without back-off, each crash would restart
    assert len(server.events("start backing off")) >= 2
    assert BACKOFF_STABLE_S > 4


def test_a_wedged_child_is_killed_and_its_request_gets_502(
    stcs: Callable[..., StcsServer],
) -> None:
    """SIGSTOP a real chroma child while a request is in flight: after dbLivenessTimeout its
    silence gets it killed, the request ends 502 instead of hanging, and the user recovers."""
    server = stcs("--dbLivenessTimeout", "1000", "--adminAPIKey", ADMIN)
    token = new_token()
    headers = {"X-Chroma-Token": token}
    assert requests.get(f"{server.url}/api/v2/heartbeat", headers=headers).status_code == 200
    listed = requests.get(f"{server.url}/admin/instances", headers={"x-api-key": ADMIN}).json()
    pid = listed["instances"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)
    started = time.monotonic()
    resp = requests.get(f"{server.url}/api/v2/heartbeat", headers=headers, timeout=20)
    took = time.monotonic() - started
    assert resp.status_code == 502
    # Not before the 1 s dbLivenessTimeout; well before the 20 s client timeout it would
    # otherwise hang until.
    assert 0.9 < took < 10, took
    [wedged] = server.wait_event("instance wedged")
    assert wedged["pid"] == pid and wedged["requests_in_flight"] == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # back-off (1 s) first, then a new chroma
        resp = requests.get(f"{server.url}/api/v2/heartbeat", headers=headers, timeout=20)
        if resp.status_code == 200:
            break
        assert resp.status_code == 503 and "Retry-After" in resp.headers
        time.sleep(0.2)
    assert resp.status_code == 200
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
