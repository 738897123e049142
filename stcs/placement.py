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

The node list is ``clusterNodes`` unless a rebalance set another at run time (``PUT
/admin/cluster``, `Placement.set_nodes`): that list is kept in ``cluster.json`` with the
``clusterNodes`` it replaced, and wins while ``config.yml`` still says that; once the operator
changes ``clusterNodes`` (start or SIGHUP reload) the config wins and the stored list is
dropped ("the newest change wins").

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
import threading
from collections.abc import Callable
from typing import Any

import structlog

from stcs.config import Settings
from stcs.errors import ConfigError, NotOwnerError, UserMovingError
from stcs.layout import Layout
from stcs.ring import Ring, parse_nodes

log = structlog.get_logger("stcs.placement")

RETRY_AFTER_S = 1  # a move closes a user for under a second (docs/scale-out.md, Figures)

ARRIVING = "arriving"
MOVED = "moved"
HOME = "home"
STATES = (ARRIVING, MOVED, HOME)


def marks_on_disk(layout: Layout) -> dict[str, str]:
    """``{userId: "moved" | "arriving"}`` as saved in ``cluster.json`` (`Placement`), read
    without a server (backups and restores run beside one, or alone).  Raises OSError or
    ValueError for an unreadable file."""
    try:
        saved = json.loads(layout.cluster_state.read_text())
    except FileNotFoundError:
        return {}
    marks = {str(user): ARRIVING for user in saved.get("arriving", [])}
    marks.update({str(user): MOVED for user in saved.get("moved", {})})
    return marks


class Placement:
    """This node's view of the cluster: the ring from the settings (read through
    ``settings``, so a reload applies) and the per-user marks saved in ``layout``."""

    def __init__(self, settings: Callable[[], Settings], layout: Layout) -> None:
        self._settings = settings
        self._layout = layout
        self._ring_key: tuple[str, str] | None = None
        self._ring: Ring | None = None
        self._saving = threading.RLock()
        self._db_dir = str(layout.db_dir)
        try:
            saved = json.loads(layout.cluster_state.read_text())
        except FileNotFoundError:
            saved = {}
        except ValueError as exc:
            # Never start without the marks: a moved user's stale copy would be served.
            raise ConfigError(
                f"{layout.cluster_state} cannot be read ({exc}): it holds which users moved "
                "away; restore it (or fix it by hand) before starting"
            ) from None
        self.arriving: set[str] = set(saved.get("arriving", []))
        self.moved: dict[str, str] = dict(saved.get("moved", {}))
        # (node list, the clusterNodes it replaced, the list of a change under way): one
        # tuple, replaced whole, so the event loop never reads a half-set one while an admin
        # call sets it from a worker thread.
        self._run: tuple[str, str, str] = (
            str(saved.get("nodes") or ""),
            str(saved.get("configNodes") or ""),
            str(saved.get("next") or ""),
        )
        self._next_ring: tuple[str, Ring] | None = None
        self.transfers: set[str] = set()  # users with a data call under way (`stcs.admin`)
        if self.run_nodes and self.run_config_nodes == settings().cluster_nodes:
            log.warning(
                "cluster node list set by a rebalance is in use",
                nodes=self.run_nodes,
                config_nodes=self.run_config_nodes,
                fix="put this list in clusterNodes of config.yml",
            )

    # -- the ring -------------------------------------------------------------------------

    @property
    def run_nodes(self) -> str:
        """The node list a rebalance set (``""``: none)."""
        return self._run[0]

    @property
    def run_config_nodes(self) -> str:
        """The ``clusterNodes`` that `run_nodes` replaced."""
        return self._run[1]

    @property
    def run_next(self) -> str:
        """The node list a change under way goes to (``PUT /admin/cluster`` with ``next``)."""
        return self._run[2]

    def nodes(self) -> tuple[str, str]:
        """(the node list in force as ``HOST:PORT,…``, ``"config"`` or ``"rebalance"``): the
        list a rebalance set while ``clusterNodes`` is still the one it replaced, else
        ``clusterNodes`` (a changed ``clusterNodes`` drops the stored list: the newest change
        wins).  ``""`` outside a cluster."""
        config_nodes = self._settings().cluster_nodes
        run = self._run
        if not run[0] or not config_nodes:
            return config_nodes, "config"
        if run[1] == config_nodes:
            return run[0], "rebalance"
        with self._saving:
            if self._run is run:  # not set anew meanwhile (`set_nodes`)
                log.info(
                    "cluster node list from config replaces the one a rebalance set",
                    nodes=config_nodes,
                    dropped=run[0],
                )
                self._run = ("", "", "")
                self._save()
        return config_nodes, "config"

    def set_nodes(self, nodes: str, next_nodes: str = "") -> None:
        """Use ``nodes`` (``HOST:PORT,…``, `ring.parse_nodes`; this node need not be in it: a
        node being removed refuses every user it has no data for) until ``clusterNodes``
        changes, and save it.  ``next_nodes``: the list a change under way goes to (a
        rebalance, from its first copy to its switch): meanwhile a never-seen user is created
        here only if *both* rings give them to this node — one created on their old node
        during the move would not be in the move, and after the switch the router would send
        them to an empty database on the new one.  Raises ValueError (a bad list, or not a
        cluster node), OSError.
        """
        settings = self._settings()
        if not settings.cluster_nodes or not settings.cluster_self:
            raise ValueError("this node is not a cluster node (clusterNodes, clusterSelf unset)")
        run = (
            ",".join(parse_nodes(nodes)),
            settings.cluster_nodes,
            ",".join(parse_nodes(next_nodes)) if next_nodes else "",
        )
        with self._saving:
            self._run = run
            self._save()

    def ring(self) -> tuple[Ring, str] | None:
        """(the ring, this node's entry), or None outside a cluster."""
        settings = self._settings()
        key = (self.nodes()[0], settings.cluster_self)
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
                "this user's database is moving or has moved to another node; retry later",
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
        if ring is None:
            return
        if ring[0].owner(user_id) != ring[1]:
            raise NotOwnerError(
                "this user belongs to another node of the cluster; retry later",
                retry_after_s=RETRY_AFTER_S,
            )
        following = self.next_ring()
        if following is not None and following.owner(user_id) != ring[1]:
            raise NotOwnerError(
                "the cluster is moving this user's place to another node; retry later",
                retry_after_s=RETRY_AFTER_S,
            )

    def next_ring(self) -> Ring | None:
        """The ring of the change under way (`set_nodes`'s ``next_nodes``), or None."""
        if not self.run_next or not self.ring():  # ring(): a changed clusterNodes drops it
            return None
        if self._next_ring is None or self._next_ring[0] != self.run_next:
            self._next_ring = (self.run_next, Ring.of(parse_nodes(self.run_next)))
        return self._next_ring[1]

    # -- the marks --------------------------------------------------------------------------

    def set_state(self, user_id: str, state: str, to: str = "") -> None:
        """Mark ``user_id`` (one of `STATES`; ``to``: the node a moved user went to) and save
        (atomically: write, then rename; 0600 — in UUID mode the names are tokens).  Raises
        ValueError for an unknown state, OSError."""
        if state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}")
        with self._saving:
            self.arriving.discard(user_id)
            self.moved.pop(user_id, None)
            if state == ARRIVING:
                self.arriving.add(user_id)
            elif state == MOVED:
                self.moved[user_id] = to
            self._save()

    def _save(self) -> None:
        # Marks are set from worker threads (the admin API's to_thread), several at once in a
        # rebalance: one writer at a time, or two would share the temporary file.
        with self._saving:
            path = self._layout.cluster_state
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                doc: dict[str, Any] = {
                    "arriving": sorted(self.arriving),
                    "moved": dict(self.moved),
                }
                nodes, config_nodes, following = self._run
                if nodes:
                    doc.update(nodes=nodes, configNodes=config_nodes)
                if following:
                    doc.update(next=following)
                fh.write(json.dumps(doc))
                fh.flush()
                os.fsync(fh.fileno())  # a target's "home" must survive a power cut
            tmp.replace(path)
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def view(self) -> dict[str, Any]:
        """``{"nodes": [...], "nodesFrom": "config" | "rebalance", "self": str, "arriving":
        [...], "moved": {user: node}}``."""
        settings = self._settings()
        nodes, source = self.nodes()
        return {
            "nodes": parse_nodes(nodes) if nodes else [],
            "nodesFrom": source,
            "next": parse_nodes(self.run_next) if self.run_next else [],
            "self": settings.cluster_self,
            "arriving": sorted(self.arriving),
            "moved": dict(sorted(self.moved.items())),
        }
