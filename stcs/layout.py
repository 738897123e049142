"""The on-disk layout under ``dbPath``, spelled in this one place.

The Node.js server's layout is kept: one chroma data directory per user, ``<dbPath>/<userId>/``.
stcs's own files live in ``<dbPath>/.stcs/`` (a name no user id can take: ids cannot start with a
dot, `stcs.auth.USER_ID_RE`)::

    <dbPath>/
      <userId>/                  chroma's data for that user (0700)
      .stcs/                     stcs's state (0700)
        stcs.lock                held by the serving stcs process (`datadir.DbPathLock`)
        locks/<userId>.lock      held for the life of that user's chroma (and by backup/restore);
                                 removed by its holder when done (`datadir.unlock_file`)
        logs/<ref>.log           each child's output, unless childLogDir says elsewhere; removed
                                 after childLogRetention without an instance
        blocked.json             the admin blocklist
        limits.json              per-user limit overrides
        cluster.json             users arriving here or moved away in a move (`stcs.placement`)
        restore-<userId>-<pid>/  a restore being staged; replaced-<userId>-<pid>/ what it replaced
        removed-<userId>-<ns>/   an old copy being deleted (`DELETE /admin/users/{userId}/data`)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATE_DIR = ".stcs"


@dataclass(frozen=True)
class Layout:
    """Paths of one ``dbPath`` (nothing is created here)."""

    db_dir: Path

    def user_dir(self, user_id: str) -> Path:
        return self.db_dir / user_id

    @property
    def state_dir(self) -> Path:
        return self.db_dir / STATE_DIR

    @property
    def server_lock(self) -> Path:
        return self.state_dir / "stcs.lock"

    @property
    def locks_dir(self) -> Path:
        return self.state_dir / "locks"

    def user_lock(self, user_id: str) -> Path:
        return self.locks_dir / f"{user_id}.lock"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def blocklist(self) -> Path:
        return self.state_dir / "blocked.json"

    @property
    def limits(self) -> Path:
        return self.state_dir / "limits.json"

    @property
    def cluster_state(self) -> Path:
        return self.state_dir / "cluster.json"

    def restore_staging(self, user_id: str, pid: int) -> Path:
        return self.state_dir / f"restore-{user_id}-{pid}"

    def restore_trash(self, user_id: str, pid: int) -> Path:
        return self.state_dir / f"replaced-{user_id}-{pid}"

    def removed_copy(self, user_id: str, stamp: int) -> Path:
        return self.state_dir / f"removed-{user_id}-{stamp}"
