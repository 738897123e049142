"""Configuration: precedence, types, errors that name the key, docs that match the code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness import stcs_cli

# The Node.js single-tenant-chroma-server's config.sample.yml, keys and value types as shipped.


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(text)
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return stcs_cli(*args, cwd=cwd, env={"PATH": "/usr/bin:/bin"}, timeout=60)


def test_check_config_prints_sources_and_masks_secrets(tmp_path: Path) -> None:
    write(
        tmp_path,
        "adminAPIKey: admin-secret-1\nauthServerAPIKey: auth-secret-2\n"
        "authServerEndpoint: https://user:pw-secret-3@auth.example/check\n",
    )
    done = run_cli("check-config", "--ttl", "5000", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for secret in ("admin-secret-1", "auth-secret-2", "pw-secret-3"):
        assert secret not in done.stdout
    line = next(x for x in done.stdout.splitlines() if x.startswith("dbTTL"))
    assert "5000" in line and "command line" in line
    assert "********" in done.stdout


def test_serve_exits_2_on_config_error_without_starting(tmp_path: Path) -> None:
    write(tmp_path, "dbMaxInstances: many\n")
    done = run_cli("serve", "--db", str(tmp_path / "db"), cwd=tmp_path)
    assert done.returncode == 2
    assert "dbMaxInstances" in done.stderr
    assert not (tmp_path / "db").exists()


def test_event_loop_uvloop_without_uvloop_is_a_usage_error(tmp_path: Path) -> None:
    # sys.modules[name] = None makes `import uvloop` raise ImportError, as when not installed.
    code = (
        "import sys; sys.modules['uvloop'] = None; from stcs.cli import main; "
        f"sys.exit(main(['serve', '--eventLoop', 'uvloop', '--db', {str(tmp_path / 'db')!r}]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 2
    assert "eventLoop uvloop: uvloop is not installed" in done.stderr
    assert not (tmp_path / "db").exists()  # nothing was started or created
