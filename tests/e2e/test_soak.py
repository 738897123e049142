"""The short form of scripts/soak: a real server under random child kills loses nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_short_soak_loses_no_write_and_leaks_no_process(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "soak.py"),
            "--users",
            "6",
            "--sessions",
            "4",
            "--max-instances",
            "2",
            "--kill-interval",
            "0.5",
            "--time-limit",
            "120",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    print(done.stdout)
    figures = json.loads(out.read_text())
    assert done.returncode == 0, done.stdout + done.stderr
    assert (figures["lost"], figures["left"], figures["5xx"]) == (0, 0, 0)
    assert figures["acked_ids"] > 0 and figures["kills"] > 0 and not figures["timed_out"]
    assert figures["stops_evicted"] + figures["stops_idle"] > 0
