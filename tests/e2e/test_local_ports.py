"""A local user holding ports cannot stop starts (issue 19, item 4; docs/security.md, "Local
users").  The attacker is uid 65534 (``setpriv``); it binds — without listening, the cheapest
hold — every port of ``childPortRange`` it can, in every shape the kernel might let it share
(``127.0.0.1`` and ``0.0.0.0``, with and without ``SO_REUSEADDR``), and keeps them."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.harness import ADMIN as HARNESS_ADMIN
from tests.harness import StcsServer, free_port, new_token, scrape

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)

ADMIN = HARNESS_ADMIN  # scrape() uses it
SPAN = 20
ATTACKER = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]

# Holds every port of FIRST..LAST it can bind, prints how many, keeps them until stdin closes.
HOLDER = """\
import socket, sys
first, last = int(sys.argv[1]), int(sys.argv[2])
held = []
for port in range(first, last + 1):
    for host, reuse in (("127.0.0.1", 0), ("127.0.0.1", 1), ("0.0.0.0", 1)):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, reuse)
        try:
            s.bind((host, port))
        except OSError:
            s.close()
            continue
        held.append(s)
        break
print(len(held), flush=True)
sys.stdin.read()
"""

# These tests start more than addressNewUsersPerMinute's 10 new users from one address: the
# bucket is off here (tests/e2e/test_fair_share.py proves it).
NO_NEW_USER_CAP = ("--addressNewUsersPerMinute", "0")


def range_args(first: int, last: int) -> list[str]:
    return ["--childPortRange", f"{first}-{last}", "--adminAPIKey", ADMIN, *NO_NEW_USER_CAP]


def free_range(span: int = SPAN) -> tuple[int, int]:
    """``span`` consecutive ports free right now (random base below the ephemeral range)."""
    for _ in range(200):
        first = random.randrange(24000, 32000 - span)
        socks = []
        try:
            for port in range(first, first + span):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return first, first + span - 1
    raise AssertionError("no free port range")


@contextlib.contextmanager
def attacker_holding(first: int, last: int) -> Iterator[int]:
    """uid 65534 binds what it can of ``first..last``; yields how many ports it holds."""
    proc = subprocess.Popen(
        [*ATTACKER, sys.executable, "-S", "-c", HOLDER, str(first), str(last)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)


def new_user_statuses(server: StcsServer, count: int = 10) -> list[int]:
    return [
        requests.get(
            f"{server.url}/api/v2/heartbeat", headers={"x-chroma-token": new_token()}, timeout=60
        ).status_code
        for _ in range(count)
    ]


def child_ports(server: StcsServer) -> dict[str, int]:
    health = requests.get(f"{server.url}/admin-health", headers={"x-api-key": ADMIN}, timeout=10)
    ports: dict[str, int] = health.json()["childPorts"]
    return ports


def test_a_local_user_binding_the_range_after_start_cannot_stop_starts(
    stcs: Callable[..., StcsServer],
) -> None:
    first, last = free_range()
    server = stcs(*range_args(first, last), "--dbTTL", "60000")
    with attacker_holding(first, last) as held:
        statuses = new_user_statuses(server)
    assert (held, statuses) == (0, [200] * 10)
    assert child_ports(server) == {"size": SPAN, "held": SPAN - 10, "lent": 10, "foreign": 0}


def test_ports_held_before_start_are_reported_and_taken_for_good_once_let_go(
    stcs: Callable[..., StcsServer],
) -> None:
    first, last = free_range()
    with attacker_holding(first, last) as held:
        assert held == SPAN
        server = stcs(*range_args(first, last))
        # Nothing can start in a range someone else holds whole (stcs never moves a child
        # outside childPortRange: the firewall rule protects that range only).
        assert new_user_statuses(server, 2) == [503, 503]
        assert child_ports(server)["foreign"] == SPAN
        assert scrape(server)[("stcs_child_ports_foreign", ())] == SPAN
        [event] = server.events("child ports held by other processes")
        assert event["count"] == SPAN and event["size"] == SPAN
    # The attacker lets go; within stcs's housekeeping period the ports are stcs's, for good.
    deadline = time.monotonic() + 10
    while child_ports(server)["foreign"]:
        assert time.monotonic() < deadline, child_ports(server)
        time.sleep(0.1)
    server.wait_event("child ports free again")
    with attacker_holding(first, last) as held_again:
        statuses = new_user_statuses(server)
    assert (held_again, statuses) == (0, [200] * 10)
    assert len(server.events("child ports held by other processes")) == 1  # logged once


def test_a_port_is_held_so_no_other_uid_can_bind_it_and_still_reaches_the_child(
    stcs: Callable[..., StcsServer],
) -> None:
    """The hold is a socket bound without ``SO_REUSEADDR``: with it, Linux lets another uid
    bind *and listen* beside a socket that is not listening.  The child still gets the port."""
    first, last = free_range(2)
    server = stcs(*range_args(first, last), "--dbTTL", "60000")
    with attacker_holding(first, last) as held:
        assert held == 0
    assert new_user_statuses(server, 2) == [200, 200]
    assert child_ports(server) == {"size": 2, "held": 0, "lent": 2, "foreign": 0}


def test_a_port_given_back_after_its_child_exited_is_held_again_despite_time_wait(
    stcs: Callable[..., StcsServer],
) -> None:
    """Chroma closes its side of the probes' connections first, so its port sits in TIME_WAIT
    for a minute after it exits: a bind without ``SO_REUSEADDR`` fails there, another uid's
    bind with it succeeds.  stcs still takes the port back at once, for good."""
    first, last = free_range(2)
    server = stcs(*range_args(first, last), "--dbTTL", "500")
    token = new_token()
    for _ in range(3):
        resp = requests.get(
            f"{server.url}/api/v2/heartbeat", headers={"x-chroma-token": token}, timeout=60
        )
        assert resp.status_code == 200
    server.wait_event("instance stopped", where=lambda e: e["reason"] == "idle", timeout=20)
    assert child_ports(server) == {"size": 2, "held": 2, "lent": 0, "foreign": 0}
    with attacker_holding(first, last) as held:
        assert held == 0


def test_a_range_larger_than_the_open_files_limit_allows_is_refused(tmp_path: Path) -> None:
    """One open file per held port: a range the hard limit cannot hold stops ``serve`` with
    exit 2 and a message naming the setting and the limit."""
    serve = ["serve", "--port", str(free_port()), "--db", str(tmp_path / "db")]
    serve += ["--childPortRange", "20000-29999"]
    done = subprocess.run(
        ["prlimit", "--nofile=2000:2000", sys.executable, "-m", "stcs", *serve],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "childPortRange" in done.stderr and "hard limit is 2000" in done.stderr
