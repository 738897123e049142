"""Readiness apart from liveness: ``/health`` says stcs lives, ``/ready`` whether a load balancer
or a Kubernetes readiness probe should send it new requests.

Not ready while starting (until `Readiness.mark_started`: the listener is up and the services
are built), while draining (shutdown begun), or when ``dbPath`` cannot take writes (read-only
file system, no write permission, no free block): a user's chroma would fail on its first
write there.  The file-system checks cost two system calls and are remembered for
`Readiness.CHECK_EVERY_S`, so a probe every few milliseconds costs nothing more.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path


class Readiness:
    """``reason()`` → None when ready, else a short reason: ``"starting"``, ``"draining"``,
    ``"dbPath not writable"``, ``"dbPath full"``.  ``shutting_down`` is the server's
    shutdown flag; ``clock`` monotonic seconds."""

    CHECK_EVERY_S = 1.0

    def __init__(
        self,
        db_dir: Path,
        shutting_down: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db_dir = db_dir
        self._shutting_down = shutting_down
        self._clock = clock
        self._started = False
        self._checked_at: float | None = None
        self._disk_reason: str | None = None

    def mark_started(self) -> None:
        """The listener is up and every service is built: ready from now on, checks allowing."""
        self._started = True

    def reason(self) -> str | None:
        if self._shutting_down():
            return "draining"
        if not self._started:
            return "starting"
        now = self._clock()
        if self._checked_at is None or now - self._checked_at >= self.CHECK_EVERY_S:
            self._checked_at = now
            self._disk_reason = self._check_disk()
        return self._disk_reason

    def _check_disk(self) -> str | None:
        try:
            fs = os.statvfs(self._db_dir)
        except OSError:
            return "dbPath not writable"
        # access(2) fails with EROFS on a read-only mount even for root; ST_RDONLY covers the
        # mount flag itself.
        if fs.f_flag & os.ST_RDONLY or not os.access(self._db_dir, os.W_OK | os.X_OK):
            return "dbPath not writable"
        if fs.f_bavail == 0:
            return "dbPath full"
        return None
