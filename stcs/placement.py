"""Which users this node may serve, in a cluster (``clusterNodes``, ``clusterSelf``).

The rule (issue 21; docs/scale-out.md): a node never creates or serves a user it does not own.

* A user whose data directory is on this node is served here (the router sends them here;
  the directory is the proof of ownership), unless a move marked them:
* **arriving**: being copied *to* this node; refused until the copy is in (the directory may
  hold a partial copy);
* **moved**: copied *away* to another node; refused for ever after (the directory is a stale
  copy, kept until ``stcs cluster cleanup``).
* A never-seen user (no directory) is started only when the ring (`stcs.ring`, nginx's own
  consistent hash over ``clusterNodes``) gives them to ``clusterSelf``; otherwise refused
  before anything is created (a router with another node list, or a move in progress,
  sent them here).

Refusals are `errors.NotOwnerError` and `errors.UserMovingError` (503 ``InternalError`` with
``Retry-After``, `stcs.answers`).  The per-user marks are set by the rebalance through the
admin API (``PUT /admin/users/{userId}/placement``) and persisted in
``<dbPath>/.stcs/cluster.json`` (`stcs.layout`), so a restart keeps refusing.  Without
``clusterNodes`` every check passes: a single node behaves as before.

The check runs where an instance is *started* (`supervisor.Supervisor`'s ``admit_start``):
a request for a running instance pays nothing, and ``GET /auth`` (which any node answers for
any user) is not concerned.  Marking a user stops their running instance first.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from stcs.config import Settings
from stcs.errors import NotOwnerError, UserMovingError
from stcs.layout import Layout
from stcs.ring import Ring, parse_nodes

RETRY_AFTER_S = 5  # a move's hold is short; a misrouted user waits for the router's reload

ARRIVING = "arriving"
MOVED = "moved"
HOME = "home"
STATES = (ARRIVING, MOVED, HOME)


class Placement:
    """This node's view of the cluster: the ring from the settings (read through
    ``settings``, so a reload applies) and the per-user marks saved in ``layout``."""

    def __init__(self, settings: Callable[[], Settings], layout: Layout) -> None:
        self._settings = settings
        self._layout = layout
        self._ring_key: tuple[str, str] | None = None
        self._ring: Ring | None = None
        self._db_dir = str(layout.db_dir)
        try:
            saved = json.loads(layout.cluster_state.read_text())
        except FileNotFoundError:
            saved = {}
        self.arriving: set[str] = set(saved.get("arriving", []))
        self.moved: dict[str, str] = dict(saved.get("moved", {}))

    # -- the ring -------------------------------------------------------------------------

    def ring(self) -> tuple[Ring, str] | None:
        """(the ring, this node's entry), or None outside a cluster."""
        settings = self._settings()
        key = (settings.cluster_nodes, settings.cluster_self)
        if not key[0]:
            return None
        if key != self._ring_key:
            self._ring = Ring.of(parse_nodes(key[0]))
            self._ring_key = key
        assert self._ring is not None
        return self._ring, key[1]

    # -- the decision -----------------------------------------------------------------------

    def state_of(self, user_id: str) -> str:
        """``arriving``, ``moved`` or ``home``."""
        if user_id in self.arriving:
            return ARRIVING
        return MOVED if user_id in self.moved else HOME

    def admit_start(self, user_id: str) -> None:
        """Before ``user_id``'s instance starts here.  Raises UserMovingError (arriving, or
        moved away) or NotOwnerError (no directory here and the ring places them on another
        node); returns when the user may start."""
        if user_id in self.arriving:
            raise UserMovingError(
                "this user's database is being moved to this node; retry later",
                retry_after_s=RETRY_AFTER_S,
            )
        if user_id in self.moved:
            raise UserMovingError(
                "this user's database has moved to another node; retry later",
                retry_after_s=RETRY_AFTER_S,
            )
        # One stat (~1 µs), only on a start: cheaper inline than a hand-off to a thread.
        if self.ring() is None or os.path.isdir(os.path.join(self._db_dir, user_id)):
            return
        self.check_owner(user_id)

    def in_cluster(self) -> bool:
        """Whether ``clusterNodes`` is set (now: it reloads)."""
        return self.ring() is not None

    def check_owner(self, user_id: str) -> None:
        """Raises NotOwnerError when the ring places ``user_id`` on another node (outside a
        cluster, never).  Called for a user with no directory here."""
        ring = self.ring()
        if ring is not None and ring[0].owner(user_id) != ring[1]:
            raise NotOwnerError(
                "this user belongs to another node of the cluster; retry later",
                retry_after_s=RETRY_AFTER_S,
            )

    # -- the marks --------------------------------------------------------------------------

    def set_state(self, user_id: str, state: str, to: str = "") -> None:
        """Mark ``user_id`` (one of `STATES`; ``to``: the node a moved user went to) and save
        (atomically: write, then rename; 0600 — in UUID mode the names are tokens).  Raises
        ValueError for an unknown state, OSError."""
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
        self.arriving.discard(user_id)
        self.moved.pop(user_id, None)
        if state == ARRIVING:
            self.arriving.add(user_id)
        elif state == MOVED:
            self.moved[user_id] = to
        path = self._layout.cluster_state
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"arriving": sorted(self.arriving), "moved": self.moved}))
        tmp.replace(path)

    def view(self) -> dict[str, Any]:
        """``{"nodes": [...], "self": str, "arriving": [...], "moved": {user: node}}``."""
        settings = self._settings()
        return {
            "nodes": parse_nodes(settings.cluster_nodes) if settings.cluster_nodes else [],
            "self": settings.cluster_self,
            "arriving": sorted(self.arriving),
            "moved": dict(sorted(self.moved.items())),
        }
