"""Restart without refusing a connection: systemd socket activation (issue 23 item 1).

systemd (PID 1) owns the listening socket of ``stcs.socket`` and passes it to every stcs it
starts; ``systemctl restart stcs`` stops one stcs (SIGTERM, drain) and starts the next while the
socket stays open, so new connections wait in the kernel's backlog.  The test plays PID 1: it
holds the listening socket for the whole test and starts each stcs through Debian's
``systemd-socket-activate``, which passes inherited ``LISTEN_FDS`` sockets through to the daemon
"in the original positions" (its man page) with ``LISTEN_PID`` set to the daemon's pid — the
same environment systemd gives a socket-activated service.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests

from tests.harness import new_token

ACTIVATE = shutil.which("systemd-socket-activate")
pytestmark = pytest.mark.skipif(
    ACTIVATE is None, reason="systemd-socket-activate missing (Debian package systemd)"
)


def _spawn(listener: socket.socket, tmp_path: Path, name: str) -> subprocess.Popen[bytes]:
    """Start ``stcs serve`` the way systemd starts a socket-activated service: the listening
    socket at fd 3, ``LISTEN_FDS=1``, ``LISTEN_PID`` its own pid (the shell's, kept by exec)."""
    port = listener.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APP_", "DB_", "AUTH_"))}
    # The activator gives the daemon a clean environment: what it needs is named with -E.
    argv = [ACTIVATE or "", *(f"--setenv={key}" for key in sorted(env))]
    argv += [sys.executable, "-m", "stcs", "serve"]
    env["FD"] = str(listener.fileno())
    script = (
        '[ "$FD" = 3 ] || eval "exec 3<&$FD $FD<&-"; export LISTEN_FDS=1 LISTEN_PID=$$; exec "$@"'
    )

    argv += ["--port", str(port), "--db", str(tmp_path / "db")]
    out = (tmp_path / f"{name}.log").open("wb")
    try:
        return subprocess.Popen(
            ["bash", "-c", script, "bash", *argv],  # bash: dash cannot redirect fds above 9
            pass_fds=(listener.fileno(),),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    finally:
        out.close()


@contextlib.contextmanager
def _held_socket() -> Iterator[socket.socket]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    try:
        yield listener
    finally:
        listener.close()


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_a_restart_through_the_socket_refuses_nothing(tmp_path: Path) -> None:
    token = new_token()
    procs: list[subprocess.Popen[bytes]] = []
    results: list[tuple[float, float, str]] = []  # (started, seconds, outcome)
    done = threading.Event()
    with _held_socket() as listener:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        path = "/api/v2/tenants/default_tenant/databases/default_database/collections"

        def loop() -> None:  # one new connection per request, as a client after a restart
            deadline = time.monotonic() + 60
            while not done.is_set() and time.monotonic() < deadline and len(results) < 5000:
                started = time.monotonic()
                try:
                    answer = requests.get(
                        url + path,
                        headers={"x-chroma-token": token, "Connection": "close"},
                        timeout=30,
                    )
                    outcome = str(answer.status_code)
                except requests.ConnectionError as exc:
                    outcome = "refused" if "refused" in str(exc).lower() else f"error {exc}"
                except requests.RequestException as exc:
                    outcome = f"error {exc}"
                results.append((started, time.monotonic() - started, outcome))
                time.sleep(0.01)

        try:
            procs.append(_spawn(listener, tmp_path, "first"))
            first = procs[0]
            client = threading.Thread(target=loop, daemon=True)
            client.start()  # the first request starts stcs's work: no wait for health first
            time.sleep(2.0)
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            kids = psutil.Process(first.pid).children(recursive=True)
            assert kids, "the user's chroma is running"
            environ = Path(f"/proc/{kids[0].pid}/environ").read_bytes()
            assert b"LISTEN_FDS=" not in environ and b"LISTEN_PID=" not in environ
            # systemctl restart: SIGTERM, wait for the exit, start the next one.
            stopping = time.monotonic()
            _stop(first)
            assert first.returncode == 0, (tmp_path / "first.log").read_text()
            procs.append(_spawn(listener, tmp_path, "second"))
            restarted = time.monotonic()
            time.sleep(3.0)
            done.set()
            client.join(40)
            assert procs[1].poll() is None, (tmp_path / "second.log").read_text()
        finally:
            done.set()
            for proc in procs:
                _stop(proc)
    outcomes = [r[2] for r in results]
    failed = [o for o in outcomes if o != "200"]
    around = [r for r in results if r[0] >= stopping - 0.5]
    longest = max(r[1] for r in around)
    print(
        f"\nrequests {len(results)}, through the restart {len(around)}, failed {len(failed)}, "
        f"longest wait {longest * 1000:.0f} ms, restart took "
        f"{(restarted - stopping) * 1000:.0f} ms"
    )
    assert len([r for r in results if r[0] > restarted]) > 10, "the loop ran on after it"
    assert failed == [], failed[:5]
    assert longest < 25, "a generous bound: a restart and one cold chroma start"
    second_log = (tmp_path / "second.log").read_text()
    assert '"socket_activation":true' in second_log.replace(" ", "")
