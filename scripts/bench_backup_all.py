"""Time of ``stcs backup --all`` / ``restore --all`` for N users of about M MB each, and each
user's hold, against a real ``stcs serve`` (README, "Back up every user").

    PYTHONPATH=. .venv/bin/python scripts/bench_backup_all.py [--users 20] [--vectors 700]

Starts a server on a temporary dbPath, gives each user one collection of ``--vectors``
128-dimension vectors (700: ~1 MB of chroma data), starts every user's chroma, then runs
``backup --all`` with the server serving, ``restore --all`` into a new dbPath with no server,
and prints the command's own per-user lines and totals.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from tests.harness import ADMIN, cli, client_for, new_token, start_stcs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--vectors", type=int, default=700)
    args = parser.parse_args()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        server = start_stcs(
            base,
            "--adminAPIKey",
            ADMIN,
            "--dbMaxInstances",
            str(args.users),
            "--addressNewUsersPerMinute",
            "0",
        )
        try:
            for _ in range(args.users):
                col = client_for(server, new_token()).create_collection("bench")
                col.add(
                    ids=[f"v{i}" for i in range(args.vectors)],
                    embeddings=[[rng.random() for _ in range(128)] for _ in range(args.vectors)],
                )
            for label, argv, kw in (
                ("backup --all (server running)", ("backup", "--all"), {"server": server}),
                ("restore --all (no server)", ("restore", "--all"), {"db": base / "fresh"}),
            ):
                started = time.monotonic()
                done = cli(*argv, str(base / "set"), "--no-progress", **kw)  # type: ignore[arg-type]
                print(f"== {label}: exit {done.returncode}, {time.monotonic() - started:.1f} s")
                print(done.stdout, done.stderr, sep="")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
