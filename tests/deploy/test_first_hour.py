"""A new user's first hour, on a fresh clone: ``scripts/serve``, the README's client snippet and
command-line example as written, ``scripts/check`` afterwards, a clean stop.

The snippets are read from README.md, so the docs cannot drift from what works.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

import chromadb
import pytest
import requests

from tests.harness import ROOT, chroma_pids_under, free_port, readme_block


def clone_checkout(dest: Path) -> Path:
    """``git clone`` this repository into ``dest``, with the working tree's uncommitted changes
    to tracked files applied (so the test sees what is being developed)."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True, timeout=120)
    diff = subprocess.run(
        ["git", "-C", str(ROOT), "diff", "--binary", "HEAD"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    if diff:
        subprocess.run(["git", "-C", str(dest), "apply"], input=diff, check=True, timeout=60)
    return dest


def give_venv(checkout: Path) -> None:
    """Make ``checkout/.venv`` as ``scripts/_venv.sh`` leaves it, without the network.

    Installing would download chromadb and a newer setuptools; instead the new environment sees
    this one's packages (a ``.pth`` file) and the checkout's own ``stcs`` first, and gets the
    ``stcs`` console script and the install stamps (``.stcs-installed-*``) that _venv.sh checks.
    ``scripts/check``'s tools are this environment's.
    """
    venv = checkout / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = venv / "lib" / py / "site-packages"
    site.mkdir(parents=True, exist_ok=True)
    (site / "stcs-first-hour.pth").write_text(f"{checkout}\n{sysconfig.get_path('purelib')}\n")
    script = venv / "bin" / "stcs"
    script.write_text(
        f"#!{venv}/bin/python\nimport sys\nfrom stcs.cli import main\nsys.exit(main())\n"
    )
    script.chmod(0o755)
    here = Path(sys.executable).parent
    for tool in ("ruff", "mypy"):
        (venv / "bin" / tool).symlink_to(here / tool)
    for extras in ("base", "test"):
        (venv / f".stcs-installed-{extras}").touch()


def git_status(checkout: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=all"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[Path]:
    if shutil.which("git") is None:
        pytest.skip("needs git")
    path = clone_checkout(tmp_path / "stcs")
    give_venv(path)
    yield path


@pytest.mark.slow
def test_fresh_clone_serves_the_readme_snippets_and_stays_clean(
    checkout: Path, tmp_path: Path
) -> None:
    cli_block = readme_block("<!-- command-line example", "bash")
    (admin_key,) = re.findall(r"^export ADMIN_API_KEY=(\S+)", cli_block, flags=re.MULTILINE)
    port = free_port()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "ANONYMIZED_TELEMETRY": "False",
        "APP_PORT": str(port),  # the one change from the README: a free port, for all commands
        "ADMIN_API_KEY": admin_key,
    }
    status_before = git_status(checkout)  # the uncommitted work under test, if any
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["scripts/serve"], cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

        # The client snippet of "Connect", as written but for the port.
        snippet = readme_block("## Connect", "python")
        token = re.search(r'^TOKEN = "([^"]+)"', snippet, flags=re.MULTILINE)
        assert token and snippet.count("port=8000") == 2
        code = snippet.replace("port=8000", f"port={port}") + "\nassert col.count() == 1\n"
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        user = token.group(1)
        db = checkout / "chromadb"
        assert (db / user).is_dir()  # the default dbPath, inside the checkout

        # What serve made is ignored by git, and scripts/check still passes beside it.
        assert git_status(checkout) == status_before
        done = subprocess.run(
            ["scripts/check"], cwd=checkout, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr

        # The command-line example, as written (the test started the server itself).
        script = "\n".join(
            line for line in cli_block.splitlines() if not line.startswith("scripts/serve")
        )
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert user in done.stdout  # in the status table
        assert f"backed up {user}" in done.stdout and f"restored {user}" in done.stdout
        client = chromadb.HttpClient(host="127.0.0.1", port=port, headers={"X-Chroma-Token": user})
        assert client.get_collection("docs").count() == 1  # the restored data

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log.read_text()
        assert chroma_pids_under(db) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
