"""scripts/setup.sh: a dry run per webServerType changes nothing; a real nginx run serves stcs."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.harness import free_port, new_token

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup.sh"
WATCHED = [
    Path("/etc/nginx"),
    Path("/etc/apache2"),
    Path("/etc/systemd/system"),
    Path("/etc/stcs"),
    Path("/opt/stcs"),
    Path("/var/lib/stcs"),
    Path("/run"),
]
ENV = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}


def snapshot() -> dict[str, tuple[int, int]]:
    """(mode, mtime) of every file and directory under the watched paths."""
    seen: dict[str, tuple[int, int]] = {}
    for top in WATCHED:
        if not top.exists():
            continue
        for path in [top, *top.rglob("*")]:
            with contextlib.suppress(OSError):
                st = path.lstat()
                seen[str(path)] = (st.st_mode, st.st_mtime_ns)
    return seen


def setup(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SETUP), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=ROOT,
    )


@pytest.mark.parametrize(
    ("web", "expected"),
    [
        ("nginx", ["nginx site (nginx)", "/etc/nginx/sites-available/", "nginx -t"]),
        ("apache", ["Apache site (apache)", "a2enmod", "proxy_http", "apache2ctl configtest"]),
        ("", ["webServerType is empty: no web server configured"]),
    ],
    ids=["nginx", "apache", "none"],
)
def test_dry_run_prints_the_steps_and_changes_nothing(
    tmp_path: Path, web: str, expected: list[str]
) -> None:
    app = f"stcs-dry-{uuid.uuid4().hex[:6]}"
    config = tmp_path / "config.yml"
    config.write_text(f'webServerType: "{web}"\nappName: "{app}"\ndbPath: "{tmp_path}/db"\n')
    before = snapshot()
    done = setup("--config", str(config), "--dry-run", "--listen", "127.0.0.1:18999")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for text in [
        *expected,
        "dry run: nothing is changed",
        "virtual environment",
        f"/etc/systemd/system/{app}.service",
        "health check",
        "dry run done",
    ]:
        assert text in out, f"{text!r} not in:\n{out}"
    assert "    $ " not in out  # no command was executed
    assert snapshot() == before
    assert not (tmp_path / "db").exists()


def test_invalid_config_stops_setup_with_the_key_named(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text("webServerType: caddy\n")
    done = setup("--config", str(config), "--dry-run")
    assert done.returncode == 2 and "webServerType" in done.stderr


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[tuple[str, Path, int]]:
    if os.geteuid() != 0 or shutil.which("start-stop-daemon", path=ENV["PATH"]) is None:
        pytest.skip("the real run needs root and start-stop-daemon")
    app = f"stcs-ci-{uuid.uuid4().hex[:6]}"
    yield app, tmp_path, free_port()
    # Stop what setup.sh started (by its pid files) and remove what it installed for `app`.
    subprocess.run(
        [
            "start-stop-daemon",
            "--stop",
            "--quiet",
            "--oknodo",
            "--retry",
            "TERM/30/KILL/5",
            "--pidfile",
            f"/run/{app}.pid",
        ],
        env=ENV,
        check=False,
    )
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(Path("/run/nginx.pid").read_text()), signal.SIGQUIT)
    time.sleep(0.5)
    for path in (
        f"/etc/nginx/sites-enabled/{app}.conf",
        f"/etc/nginx/sites-available/{app}.conf",
        f"/etc/systemd/system/{app}.service",
        f"/run/{app}.pid",
    ):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@pytest.mark.slow
def test_real_run_with_nginx_serves_stcs_and_is_idempotent(
    installed: tuple[str, Path, int],
) -> None:
    app, tmp, port = installed
    config = tmp / "config.yml"
    config.write_text(
        f'webServerType: "nginx"\nappName: "{app}"\nappPort: {free_port()}\n'
        f'dbPath: "{tmp}/db"\nlogFile: "{tmp}/log/stcs.log"\n'
    )
    args = [
        "--config",
        str(config),
        "--venv",
        str(Path(sys.executable).parent.parent),
        "--etc",
        str(tmp / "etc"),
        "--workdir",
        str(tmp / "work"),
        "--user",
        "root",
        "--listen",
        f"127.0.0.1:{port}",
    ]
    first = setup(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "answers 200" in first.stdout

    base = f"http://127.0.0.1:{port}"
    assert requests.get(f"{base}/health", timeout=10).json() == {"status": "ok"}
    token = new_token()
    resp = requests.get(f"{base}/api/v2/heartbeat", headers={"X-Chroma-Token": token}, timeout=30)
    assert resp.status_code == 200 and "nanosecond heartbeat" in resp.text
    assert (tmp / "db" / token).is_dir() and (tmp / "log" / "stcs.log").is_file()
    assert Path(f"/etc/systemd/system/{app}.service").is_file()

    again = setup(*args)  # re-run: nothing to change, still serving
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"unchanged: /etc/nginx/sites-available/{app}.conf" in again.stdout
    assert f"unchanged: {tmp}/etc/config.yml" in again.stdout
    assert requests.get(f"{base}/health", timeout=10).status_code == 200
