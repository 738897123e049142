"""Cost of the quota hooks on the request path (stcs.quotas), in µs per request.

    .venv/bin/python scripts/bench_quotas.py [--n 200000]

Times ``await quotas.admit(user, method, path)`` + ``admission.done(200)`` in one event loop,
best of 5 runs, for: every limit off (the default), one limit on (rate), and every limit on
(rate, concurrency, disk; the write's count check, one local GET to chroma, is not included).
No server is started; the data directory is a temporary, empty one.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from stcs.config import load_settings
from stcs.metrics import Metrics
from stcs.quotas import Quotas
from stcs.upstream import UpstreamPool

READ = ("POST", "/api/v2/tenants/default_tenant/databases/default_database/collections/c1/query")
WRITE = ("POST", "/api/v2/tenants/default_tenant/databases/default_database/collections/c1/add")
ALL_ON = {
    "userMaxDiskMB": "1000",
    "userMaxCollections": "100",
    "userMaxRecordsPerCollection": "1000000",
    "userRequestsPerSecond": "1000000000",
    "userMaxConcurrentRequests": "100",
}


async def per_call_us(cli: dict[str, str], request: tuple[str, str], n: int, db: Path) -> float:
    quotas = Quotas(load_settings(cli=cli, environ={}).settings, db, UpstreamPool(), Metrics())
    quotas.disk.sizes["u"] = 0  # measured: the path reads the cached size
    method, path = request
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            admission = await quotas.admit("u", method, path)
            admission.done(200)
        best = min(best, time.perf_counter() - started)
        await asyncio.sleep(0.05)  # let scheduled disk refreshes run outside the timing
    await quotas.close()
    return best / n * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="calls per run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp)
        rows = [
            ("all limits off, read", {}, READ),
            ("all limits off, write", {}, WRITE),
            ("rate limit on, read", {"userRequestsPerSecond": "1000000000"}, READ),
            ("all limits on, read", ALL_ON, READ),
            ("all limits on, write (admit + done, without the count GET)", ALL_ON, WRITE),
        ]
        print("| case | µs per request |\n|---|---|")
        for name, cli, request in rows:
            print(f"| {name} | {await per_call_us(cli, request, args.n, db):.2f} |")


if __name__ == "__main__":
    asyncio.run(main())
