"""``stcs cluster …``: change a cluster's node list through the nodes' admin APIs.

* ``stcs cluster plan --from A,B,C --to A,B,C,D [--json]``: asks each current node
  (``GET /admin/users``) which users it holds, computes each user's owner under the new node
  list with nginx's own consistent hash (`stcs.ring`) and prints who moves where, with the
  bytes to copy.
* ``stcs cluster rebalance --from … --to … --router-config PATH --reload-command CMD
  [--dry-run] [--state FILE] [--yes]``: carries the plan out (`stcs.rebalance`).
* ``stcs cluster cleanup --nodes … [--dry-run]``: removes the old copies of moved users whose
  new node serves them.

Nodes are named ``HOST:PORT`` exactly as the router's upstream block names them (the ring
hashes that text: ``10.0.0.11:8000`` and ``node-a:8000`` are different rings).  Each node's
admin API is reached at ``http://HOST:PORT`` with ``adminAPIKey`` (from ``--adminAPIKey``,
``ADMIN_API_KEY`` or ``config.yml``, as ``stcs backup`` takes it).  No SSH, no shared disk.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from stcs.backup import AdminClient, OperationError
from stcs.config import Resolved
from stcs.ring import Ring, parse_nodes

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class NodeAdmin(AdminClient):
    """The admin API of cluster node ``node`` (``HOST:PORT``), plain HTTP."""

    def __init__(self, node: str, admin_key: str) -> None:
        self.base = f"http://{node}"
        self._key = admin_key
        self._context = None
        self.node = node
        self.key = admin_key


@dataclass
class Plan:
    """What changing the node list ``old`` → ``new`` does to the users found on ``old``.

    ``moves``: ``{user: (from, to)}``; ``sizes``: user -> bytes on its node; ``duplicates``:
    users found on more than one node (a split or an old copy left by hand: resolve first);
    ``misplaced``: users on a node other than their owner under ``old`` (the router sends
    them elsewhere today).
    """

    old: list[str]
    new: list[str]
    placement: dict[str, str] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    moves: dict[str, tuple[str, str]] = field(default_factory=dict)
    duplicates: dict[str, list[str]] = field(default_factory=dict)
    misplaced: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def bytes_moved(self) -> int:
        return sum(self.sizes.get(u, 0) for u in self.moves)

    def as_json(self) -> dict[str, Any]:
        return {
            "from": self.old,
            "to": self.new,
            "users": len(self.placement),
            "moving": len(self.moves),
            "bytesMoved": self.bytes_moved,
            "moves": [
                {"userId": u, "from": a, "to": b, "diskBytes": self.sizes.get(u, 0)}
                for u, (a, b) in sorted(self.moves.items())
            ],
            "perNode": {
                n: sum(1 for u, o in self.placement.items() if self._after(u, o) == n)
                for n in self.new
            },
            "duplicates": self.duplicates,
            "misplaced": {u: {"on": a, "owner": b} for u, (a, b) in self.misplaced.items()},
        }

    def _after(self, user: str, node: str) -> str:
        move = self.moves.get(user)
        return move[1] if move else node


def compute_plan(old: list[str], new: list[str], found: dict[str, list[dict[str, Any]]]) -> Plan:
    """The plan from ``found`` (node -> its ``GET /admin/users`` entries; entries marked
    ``moved`` or ``arriving`` are copies, not the user's data, and are skipped).  Pure."""
    plan = Plan(old, new)
    where: dict[str, list[str]] = {}
    for node in old:
        for entry in found.get(node, []):
            if entry.get("placement", "home") != "home":
                continue  # an old copy (moved away) or a partial one (arriving): not the data
            user = str(entry["userId"])
            where.setdefault(user, []).append(node)
            plan.sizes[user] = plan.sizes.get(user, 0) + int(entry.get("diskBytes") or 0)
    old_ring, new_ring = Ring.of(old), Ring.of(new)
    for user, nodes in sorted(where.items()):
        if len(nodes) > 1:
            plan.duplicates[user] = nodes
            continue
        node = nodes[0]
        plan.placement[user] = node
        if old_ring.owner(user) != node:
            plan.misplaced[user] = (node, old_ring.owner(user))
        target = new_ring.owner(user)
        if target != node:
            plan.moves[user] = (node, target)
    return plan


def survey(nodes: list[str], admin_key: str) -> dict[str, list[dict[str, Any]]]:
    """``GET /admin/users`` of every node, in parallel.  Raises OperationError naming the
    first node that did not answer."""
    with ThreadPoolExecutor(max_workers=min(16, len(nodes))) as pool:
        answers = pool.map(
            lambda n: (n, NodeAdmin(n, admin_key).request("GET", "/admin/users", timeout=120)),
            nodes,
        )
        return {node: list(answer.get("users", [])) for node, answer in answers}


# -- the command line ---------------------------------------------------------------------------


def add_parser(sub: Any, settings: argparse.ArgumentParser) -> None:
    """Add ``stcs cluster`` to the ``stcs`` subcommands ``sub`` (``settings``: the parent
    parser with every setting's flag, for ``--adminAPIKey`` and ``--config``)."""
    cluster = sub.add_parser(
        "cluster",
        help="plan a change of the cluster's node list",
        description="Works through each node's admin API (adminAPIKey); nodes are HOST:PORT "
        "as the router's upstream block names them.",
    )
    verbs = cluster.add_subparsers(dest="cluster_command", required=True)
    plan = verbs.add_parser(
        "plan",
        parents=[settings],
        help="who moves where when the node list changes",
        description="Ask every current node for its users and compute, with nginx's "
        "consistent hash, which of them the new node list places on another node.",
    )
    plan.add_argument("--from", dest="old", required=True, metavar="HOST:PORT,…")
    plan.add_argument("--to", dest="new", required=True, metavar="HOST:PORT,…")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    move = verbs.add_parser(
        "rebalance",
        parents=[settings],
        help="move the users a node-list change moves, then switch the router",
        description="Copy each moving user to its new node while it serves, close the moving "
        "users on their sources, copy what changed, render the router for --to and run "
        "--reload-command, then open them on their targets. Safe to interrupt and run again "
        "(--state), or to undo with --abort before the switch. Old copies stay until "
        "`stcs cluster cleanup`.",
    )
    move.add_argument("--from", dest="old", required=True, metavar="HOST:PORT,…")
    move.add_argument("--to", dest="new", required=True, metavar="HOST:PORT,…")
    move.add_argument(
        "--router-config",
        required=True,
        metavar="PATH",
        help="the router file `stcs render nginx-cluster -o` wrote (rendered again for --to)",
    )
    move.add_argument(
        "--reload-command",
        required=True,
        metavar="CMD",
        help="shell command that reloads the router, e.g. 'nginx -s reload'",
    )
    move.add_argument("--dry-run", action="store_true", help="print the plan and the steps only")
    move.add_argument(
        "--state",
        default="stcs-rebalance.json",
        metavar="FILE",
        help="where the run records its steps (default ./stcs-rebalance.json)",
    )
    move.add_argument("--yes", action="store_true", help="do not ask before starting")
    move.add_argument(
        "--abort",
        action="store_true",
        help="undo a run of this change stopped before its router switch, from the nodes' "
        "marks (the --state file is not needed): users served by their sources again, no "
        "change announced",
    )
    clean = verbs.add_parser(
        "cleanup",
        parents=[settings],
        help="remove old copies of moved users whose new node serves them",
    )
    clean.add_argument("--nodes", required=True, metavar="HOST:PORT,…")
    clean.add_argument("--dry-run", action="store_true", help="say what would be removed")


def main(resolved: Resolved, args: argparse.Namespace) -> int:
    """Run ``stcs cluster``; the exit code."""
    if args.cluster_command == "rebalance":
        return _rebalance(resolved, args)
    if args.cluster_command == "cleanup":
        return _cleanup(resolved, args)
    try:
        old, new = parse_nodes(args.old), parse_nodes(args.new)
    except ValueError as exc:
        print(f"stcs cluster: {exc}", file=sys.stderr)
        return EXIT_USAGE
    key = resolved.settings.admin_api_key
    try:
        found = survey(old, key)
    except OperationError as exc:
        print(f"stcs cluster {args.cluster_command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    plan = compute_plan(old, new, found)
    if args.json:
        print(json.dumps(plan.as_json(), indent=2))
    else:
        print_plan(plan)
    return EXIT_OK


def print_plan(plan: Plan) -> None:
    n = len(plan.placement)
    pct = 100 * len(plan.moves) / n if n else 0.0
    print(
        f"{len(plan.old)} -> {len(plan.new)} nodes: {n} users, {len(plan.moves)} move "
        f"({pct:.0f} %), {plan.bytes_moved / 2**20:.1f} MB to copy"
    )
    if plan.moves:
        rows = [("USER", "FROM", "TO", "MB")] + [
            (u, a, b, f"{plan.sizes.get(u, 0) / 2**20:.1f}")
            for u, (a, b) in sorted(plan.moves.items())
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    for user, nodes in sorted(plan.duplicates.items()):
        print(f"warning: {user} is on {', '.join(nodes)}: keep one copy first", file=sys.stderr)
    for user, (on, owner) in sorted(plan.misplaced.items()):
        print(
            f"warning: {user} is on {on} but the current ring routes it to {owner}", file=sys.stderr
        )


def _rebalance(resolved: Resolved, args: argparse.Namespace) -> int:
    from pathlib import Path

    from stcs.rebalance import RebalanceOptions, rebalance

    try:
        old, new = parse_nodes(args.old), parse_nodes(args.new)
    except ValueError as exc:
        print(f"stcs cluster: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if old == new:
        print("stcs cluster rebalance: --from and --to are the same list", file=sys.stderr)
        return EXIT_USAGE
    options = RebalanceOptions(
        router_config=Path(args.router_config),
        reload_command=args.reload_command,
        state_path=Path(args.state),
        dry_run=args.dry_run,
    )
    key, settings = resolved.settings.admin_api_key, resolved.settings
    if args.abort:
        from stcs.rebalance import abort

        def undo() -> int:
            abort(old, new, key, settings, options, sys.stdout)
            return EXIT_OK

        return _exit_code("stcs cluster rebalance --abort", "run again", undo)
    if not (args.yes or args.dry_run or Path(args.state).exists()):
        if not sys.stdin.isatty():
            print("stcs cluster rebalance: pass --yes (or --dry-run first)", file=sys.stderr)
            return EXIT_USAGE
        answer = input(f"move users from {args.old} to {args.new}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            return EXIT_USAGE
    return _exit_code(
        "stcs cluster rebalance",
        "run again to resume",
        lambda: rebalance(old, new, key, settings, options).exit_code,
    )


def _exit_code(command: str, retry: str, run: Callable[[], int]) -> int:
    """``run()``'s exit code; a refusal (RebalanceRefused) is a usage error, a failed operation
    (OperationError) a failure whose message ends with ``retry``."""
    from stcs.rebalance import RebalanceRefused

    try:
        return run()
    except RebalanceRefused as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OperationError as exc:
        print(f"{command}: {exc} ({retry})", file=sys.stderr)
        return EXIT_FAILURE


def _cleanup(resolved: Resolved, args: argparse.Namespace) -> int:
    from stcs.rebalance import cleanup

    try:
        nodes = parse_nodes(args.nodes)
    except ValueError as exc:
        print(f"stcs cluster: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        cleanup(nodes, resolved.settings.admin_api_key, dry_run=args.dry_run)
    except OperationError as exc:
        print(f"stcs cluster cleanup: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
