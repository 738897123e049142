"""``stcs cluster rebalance`` and ``stcs cluster cleanup``: carry a node-list change out.

Data moves through the operator's machine: this process pulls each moving user's files from
the source node's admin API (``…/manifest``, ``…/export``) and pushes them to the target's
(``…/import``, ``…/prune``; `stcs.transfer`).  No SSH, no shared disk, no trust between nodes.

The steps (`rebalance`), each recorded in the state file *before* it runs, so an interrupted
run started again with the same ``--from``/``--to`` resumes:

1. **plan** (`cluster.compute_plan`); users found on two nodes refuse the run.
2. **copy**: every node is told of the change (``PUT /admin/cluster`` with ``next``: no
   never-seen user whom it moves is created meanwhile), the users asked for again; each
   target marks its users ``arriving`` (they are refused there), then pass 1 copies what
   differs (`delta`) while the user keeps serving on its source.
3. **close** every moving user on its source (`Holds`: marked ``moved`` there, kept on disk,
   no TTL): requests in flight finish, their chroma stops, new ones get 503 + ``Retry-After``.
4. **pass 2**: the delta again, plus every file whose source mtime is within `RECENT_NS` of
   pass 1's manifest (file times are coarse: a write in the same tick as pass 1's read leaves
   size and mtime equal).  Chroma is stopped, so this copy is consistent.
5. A failed copy (pass 1 or 2): every source opened again (``home``), the announcement
   withdrawn, every user stays on its source, serving
   (targets stay ``arriving``, refused, and the router is unchanged); exit 1.  The router
   switch is all or nothing: nginx routes by the ring, not per user.
6. Blocklist entry and limit overrides go to the target.
7. The router file is rendered again with the ``--to`` nodes (`deploy.read_record`: the
   options it was rendered with), the previous one kept as ``PATH.prev``, and the reload
   command run; if it fails the previous file is put back, the command run again, and the
   sources opened again.
8. **switch**: every node's list set to ``--to`` (``PUT /admin/cluster``, the announcement
   ends), targets marked ``home``.  A refused request's retry goes through the new router to
   the target.

`abort` undoes a run stopped before its switch (sources opened, announcement withdrawn).

Old copies stay until `cleanup` (``DELETE …/data``, only where the new node serves the user).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from stcs.backup import Bar, OperationError, progress_bar
from stcs.cluster import NodeAdmin, Plan, compute_plan, print_plan, survey
from stcs.config import Settings
from stcs.deploy import read_record, render
from stcs.errors import ConfigError
from stcs.localfiles import private_partial, publish

HOLD_DRAIN_S = 60  # requests in flight on a source may finish for this long
HOLD_PARALLEL = 8  # hold calls in flight at once
RECENT_NS = 2_000_000_000  # pass 2 copies files this recent again whatever their size, mtime
RELOAD_TIMEOUT_S = 120
PATHS_PER_CALL = 1000  # paths per export or prune call (a JSON body of ~100 kB)
PIPE_CHUNK = 1 << 20
HTTP_TIMEOUT_S = 600

# The state file's steps, in order.
COPY, HOLD, SWITCH, DONE = "copy", "hold", "switch", "done"


class RebalanceRefused(OperationError):
    """The run cannot start (usage, duplicates, a state file of another run, a router file
    without its render record); the exit code is 2."""


# -- the pure parts ---------------------------------------------------------------------------


def delta(
    source: list[dict[str, Any]], target: list[dict[str, Any]], recent_since_ns: int | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """(source files to copy, target paths to prune) from two manifests' ``files``.

    A source file is copied when the target lacks it or its ``size`` or ``mtimeNs`` differs,
    and (pass 2, ``recent_since_ns`` given) when its ``mtimeNs`` is at or after
    ``recent_since_ns`` (pass 1's ``takenAtNs`` less `RECENT_NS`) even if both match.  Target
    paths the source lacks are pruned.  Pure.
    """
    have = {f["path"]: f for f in target}
    copy = []
    for f in source:
        mine = have.get(f["path"])
        if (
            mine is None
            or mine["size"] != f["size"]
            or mine["mtimeNs"] != f["mtimeNs"]
            or (recent_since_ns is not None and f["mtimeNs"] >= recent_since_ns)
        ):
            copy.append(f)
    wanted = {f["path"] for f in source}
    return copy, sorted(p for p in have if p not in wanted)


def write_private_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` at once (a 0600 temporary file renamed over it: the state
    names users, and in UUID mode user ids are tokens).  Raises OSError."""
    partial, handle = private_partial(path)
    with handle:
        handle.write(json.dumps(doc, indent=1).encode())
        handle.flush()
        os.fsync(handle.fileno())
    publish(partial, path, replace=True)


class RunState:
    """The state file: ``{"from", "to", "step", "moves": {user: {"from", "to", "phase",
    "takenAtNs", "bytes", "files", "error"}}, "plan": {...}}``, saved before each step."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path = path
        self.doc = doc

    @classmethod
    def load(cls, path: Path, old: list[str], new: list[str]) -> RunState | None:
        """The run recorded in ``path`` (None: no file).  Raises RebalanceRefused when it
        records another change than ``old`` -> ``new``, or cannot be read."""
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RebalanceRefused(f"state file {path} cannot be read: {exc}") from None
        if doc.get("from") != old or doc.get("to") != new:
            raise RebalanceRefused(
                f"state file {path} records another change ({','.join(doc.get('from', []))} -> "
                f"{','.join(doc.get('to', []))}); finish that one, or remove the file to start "
                "this one"
            )
        return cls(path, doc)

    @classmethod
    def new(cls, path: Path, plan: Plan) -> RunState:
        moves = {user: _planned(a, b) for user, (a, b) in sorted(plan.moves.items())}
        doc = {
            "from": plan.old,
            "to": plan.new,
            "step": COPY,
            "moves": moves,
            "plan": plan.as_json(),
        }
        return cls(path, doc)

    @property
    def step(self) -> str:
        return str(self.doc["step"])

    @property
    def moves(self) -> dict[str, dict[str, Any]]:
        moves: dict[str, dict[str, Any]] = self.doc["moves"]
        return moves

    def save(self, step: str | None = None) -> None:
        if step is not None:
            self.doc["step"] = step
        write_private_json(self.path, self.doc)


def _planned(source: str, target: str) -> dict[str, Any]:
    return {"from": source, "to": target, "phase": "planned", "takenAtNs": None, "bytes": 0}


def _refuse_duplicates(plan: Plan) -> None:
    """Raise RebalanceRefused when ``plan`` found users on more than one node."""
    if plan.duplicates:
        raise RebalanceRefused(
            "users are on more than one node: "
            + ", ".join(f"{u} ({', '.join(n)})" for u, n in sorted(plan.duplicates.items()))
            + "; keep one copy of each first"
        )


def _add_moves(state: RunState, plan: Plan) -> None:
    """Add to ``state`` the moves of ``plan`` it lacks (users created since its plan), and save.
    Raises RebalanceRefused for users now found on two nodes."""
    _refuse_duplicates(plan)
    added = {u: m for u, m in plan.moves.items() if u not in state.moves}
    for user, (source, target) in sorted(added.items()):
        state.moves[user] = _planned(source, target)
    if added:
        state.save()


# -- the report -------------------------------------------------------------------------------


@dataclass
class RebalanceReport:
    """What a run did: ``exit_code`` (0 done, 1 failed and rolled back, 2 refused),
    ``moved``: users now served by their new node; ``failed``: user -> why; ``bytes`` and
    ``files`` copied (both passes); ``seconds`` in all; ``held_s``: user -> seconds held (their
    requests waited; from the hold call to its release)."""

    exit_code: int = 0
    moved: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    bytes: int = 0
    files: int = 0
    seconds: float = 0.0
    held_s: dict[str, float] = field(default_factory=dict)
    dry_run: bool = False

    @property
    def held_p50_s(self) -> float:
        return statistics.median(self.held_s.values()) if self.held_s else 0.0

    @property
    def held_max_s(self) -> float:
        return max(self.held_s.values(), default=0.0)


# -- talking to the nodes ---------------------------------------------------------------------


def _http_error(method: str, url: str, exc: urllib.error.HTTPError) -> OperationError:
    try:
        message = json.loads(exc.read()).get("message", exc.reason)
    except ValueError:
        message = exc.reason
    return OperationError(f"{method} {url}: {exc.code} {message}")


@contextlib.contextmanager
def _open(node: NodeAdmin, method: str, path: str, data: Any, content_type: str) -> Iterator[Any]:
    headers = {"x-api-key": node.key, "Content-Type": content_type}
    req = urllib.request.Request(f"{node.base}{path}", data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
            yield resp
    except urllib.error.HTTPError as exc:
        raise _http_error(method, f"{node.node}{path}", exc) from None
    except (urllib.error.URLError, OSError) as exc:
        raise OperationError(f"{method} {node.node}{path}: {exc}") from None


def stream_files(src: NodeAdmin, dst: NodeAdmin, user: str, paths: list[str], bar: Bar) -> int:
    """Export ``paths`` of ``user`` from ``src`` and import them into ``dst``, piped through
    this process in `PIPE_CHUNK` pieces (memory stays bounded).  The bytes piped.  Raises
    OperationError."""
    piped = 0
    body = json.dumps({"paths": paths}).encode()
    with _open(src, "POST", f"/admin/users/{user}/export", body, "application/json") as tar:

        def pieces() -> Iterator[bytes]:
            nonlocal piped
            while chunk := tar.read(PIPE_CHUNK):
                piped += len(chunk)
                bar.update(len(chunk))
                yield chunk

        # No Content-Length: urllib sends the iterator chunked.
        with _open(dst, "POST", f"/admin/users/{user}/import", pieces(), "application/x-tar"):
            pass
    return piped


def copy_pass(
    src: NodeAdmin, dst: NodeAdmin, user: str, bar: Bar, recent_since_ns: int | None = None
) -> tuple[dict[str, Any], int, int]:
    """One pass for ``user``: manifests of both sides, then the delta exported, imported and
    pruned.  (the source's manifest, bytes copied, files copied).  Raises OperationError."""
    source = src.request("GET", f"/admin/users/{user}/manifest", timeout=HTTP_TIMEOUT_S)
    target = dst.request("GET", f"/admin/users/{user}/manifest", timeout=HTTP_TIMEOUT_S)
    if target.get("placement") != "arriving":
        raise OperationError(f"{dst.node} does not mark {user} arriving: not copying over it")
    copy, prune = delta(source["files"], target["files"], recent_since_ns)
    size = sum(int(f["size"]) for f in copy)
    bar.total = (bar.total or 0) + size
    bar.refresh()
    paths = [f["path"] for f in copy]
    for i in range(0, len(paths), PATHS_PER_CALL):
        stream_files(src, dst, user, paths[i : i + PATHS_PER_CALL], bar)
    for i in range(0, len(prune), PATHS_PER_CALL):
        dst.request(
            "POST", f"/admin/users/{user}/prune", body={"paths": prune[i : i + PATHS_PER_CALL]}
        )
    return source, size, len(copy)


class Holds:
    """The moving users' sources, closed for the copy that counts: user -> monotonic time it
    was closed.  A source is closed by marking the user ``moved`` there (``PUT
    …/placement``: requests in flight finish, the chroma stops, and from then on the source
    refuses the user, 503 + ``Retry-After``), not by a maintenance hold: the mark is kept on
    disk, has no TTL to run out during a long copy, survives a restart of the source and is not
    ended by another tool's hold (``stcs backup`` holds and releases too).  Rolled back (marked
    ``home``) by `release_all` when the run fails before the switch; kept by `finish`."""

    def __init__(self, admins: dict[str, NodeAdmin], moves: dict[str, dict[str, Any]]) -> None:
        self._admins = admins
        self._moves = moves
        self.since: dict[str, float] = {}
        self.held_s: dict[str, float] = {}

    def _close(self, user: str) -> None:
        move = self._moves[user]
        self._admins[move["from"]].request(
            "PUT",
            f"/admin/users/{user}/placement?drainTimeout={HOLD_DRAIN_S}",
            body={"state": "moved", "to": move["to"]},
            timeout=HOLD_DRAIN_S + 60,
        )

    def hold_all(self, users: list[str]) -> None:
        """Close ``users``' sources, at most `HOLD_PARALLEL` calls at once (each waits for the
        user's requests in flight and the stop of its chroma: one after the other, the first
        user would wait for every other's).  Raises OperationError (the first failure; those
        closed stay recorded, for `release_all`)."""
        now = time.monotonic()
        for user in users:
            self.since.setdefault(user, now)
        with ThreadPoolExecutor(max_workers=min(HOLD_PARALLEL, max(1, len(users)))) as pool:
            for _ in pool.map(self._close, users):
                pass

    def check(self) -> None:
        """Raise OperationError unless every source still marks its users ``moved`` to their
        target (an operator's ``home`` mark meanwhile would let the user write after pass 2)."""
        by_node: dict[str, list[str]] = {}
        for user in self.since:
            by_node.setdefault(self._moves[user]["from"], []).append(user)
        for node, users in by_node.items():
            moved = self._admins[node].request("GET", "/admin/cluster").get("moved", {})
            lost = [u for u in users if moved.get(u) != self._moves[u]["to"]]
            if lost:
                raise OperationError(f"{node} no longer marks {', '.join(lost)} moved")

    def release_all(self) -> None:
        """Open every source again (mark ``home``): the run did not switch.  Each is tried;
        failures printed (mark them home by hand: ``PUT …/placement {"state": "home"}``)."""
        for user in list(self.since):
            src = self._admins[self._moves[user]["from"]]
            try:
                src.request("PUT", f"/admin/users/{user}/placement", body={"state": "home"})
            except OperationError as exc:
                print(
                    f"warning: {exc}; {user} stays refused on {src.node} until marked home",
                    file=sys.stderr,
                )
            self.held_s[user] = time.monotonic() - self.since.pop(user)

    def finish(self) -> None:
        """The switch is done: the sources stay ``moved``; record how long each was closed."""
        for user in list(self.since):
            self.held_s[user] = time.monotonic() - self.since.pop(user)


# -- the router -------------------------------------------------------------------------------


def check_router(path: Path, settings: Settings, old: list[str], new: list[str]) -> str:
    """The router file rendered again for ``new`` (its render record read; it must route to
    ``old`` or, on a resumed run, ``new``).  Raises RebalanceRefused."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise RebalanceRefused(f"--router-config {path}: {exc.strerror}") from None
    try:
        recorded, options = read_record(text, settings)
    except ConfigError as exc:
        raise RebalanceRefused(f"--router-config {path}: {exc}") from None
    if list(options.nodes) not in (old, new):
        raise RebalanceRefused(
            f"--router-config {path} routes to {','.join(options.nodes)}, not to --from"
        )
    try:
        return render("nginx-cluster", recorded, dataclasses.replace(options, nodes=tuple(new)))
    except ConfigError as exc:
        raise RebalanceRefused(f"--router-config {path}: {exc}") from None


class RouterRestoredError(OperationError):
    """The reload failed, and the previous router file was put back and reloaded: the router
    routes as before (the run may roll back)."""


def switch_router(path: Path, text: str, reload_command: str, out: IO[str]) -> None:
    """Install ``text`` at ``path`` (same mode; the previous file kept as ``PATH.prev``) and
    run ``reload_command`` (a shell command, at most `RELOAD_TIMEOUT_S`).  A file that holds
    ``text`` already (a resumed run) is only reloaded, ``PATH.prev`` kept.  On failure the
    previous file is put back and reloaded: RouterRestoredError; OperationError when that
    reload fails too (the router's state is unknown)."""
    previous = path.read_bytes()
    mode = path.stat().st_mode & 0o777
    prev = path.with_name(path.name + ".prev")
    if previous == text.encode() and prev.exists():
        previous = prev.read_bytes()  # switched by an earlier attempt: .prev is the old one
    else:
        _write_as(prev, previous, mode)
        _write_as(path, text.encode(), mode)
    print(f"router: {path} written (previous in {prev}); running {reload_command}", file=out)
    failure = _run_reload(reload_command)
    if failure:
        _write_as(path, previous, mode)
        # The router may have taken the new file before the command failed or timed out:
        # reload it again with the previous one, so it routes as the nodes still do.
        again = _run_reload(reload_command)
        if not again:
            raise RouterRestoredError(
                f"reload command failed ({failure}); {path} put back as it was and reloaded"
            )
        raise OperationError(
            f"reload command failed ({failure}); {path} put back as it was, but reloading it "
            f"failed too ({again}): the router may route either list — run again to finish"
        )


def _write_as(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` (``mode``) at once: a new file (``O_EXCL``, never
    through a link another user planted; a random name), synced, renamed over it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _run_reload(command: str) -> str:
    """Run the router's reload ``command`` (a shell command, in its own process group, at most
    `RELOAD_TIMEOUT_S`: on timeout the whole group is killed, not only the shell); ``""`` on
    success, else what went wrong."""
    proc = subprocess.Popen(
        command,
        shell=True,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=RELOAD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"no end within {RELOAD_TIMEOUT_S} s"
    return "" if proc.returncode == 0 else f"exit {proc.returncode}: {err.strip()}"


# -- the run ----------------------------------------------------------------------------------


@dataclass
class RebalanceOptions:
    """A run's inputs besides the node lists (see ``stcs cluster rebalance --help``)."""

    router_config: Path
    reload_command: str
    state_path: Path = Path("stcs-rebalance.json")
    dry_run: bool = False
    progress: bool | None = None  # None: a bar on a terminal only
    on_step: Callable[[str], None] | None = None  # called after each step (tests interrupt)


def rebalance(
    old: list[str],
    new: list[str],
    admin_key: str,
    settings: Settings,
    options: RebalanceOptions,
    out: IO[str] = sys.stdout,
) -> RebalanceReport:
    """Carry the change ``old`` -> ``new`` out (the module's steps); the report.

    Raises RebalanceRefused (nothing changed: exit 2) and OperationError for a node that does
    not answer outside a copy (the state file says where it stopped; run again).
    """
    started = time.monotonic()
    report = RebalanceReport(dry_run=options.dry_run)
    router_text = check_router(options.router_config, settings, old, new)
    state = RunState.load(options.state_path, old, new)
    if state is None:
        nodes = list(dict.fromkeys(old + new))
        found = survey(nodes, admin_key)  # one walk of every node's users for both
        _refuse_unfinished(nodes, admin_key, found)
        plan = compute_plan(old, new, found)
        _refuse_duplicates(plan)
        if options.dry_run:
            print_plan(plan)
            _print_steps(plan, options, out)
            return report
        state = RunState.new(options.state_path, plan)
        state.save()
    elif options.dry_run:
        print(f"a run is recorded in {options.state_path} at step {state.step!r}", file=out)
        return report
    if state.step == DONE:
        print(
            f"this change is done ({options.state_path}); remove the file to start another",
            file=out,
        )
        return report
    admins = {n: NodeAdmin(n, admin_key) for n in dict.fromkeys(old + new)}
    moves = state.moves
    holds = Holds(admins, moves)
    step = state.step
    # Set (and saved) before the router file is written: from then on the router may route
    # the new list, and nothing may be rolled back (`abort` refuses; failures say run again).
    router_touched = bool(state.doc.get("routerTouched"))
    try:
        if step == COPY:
            # From now until the switch no node creates a never-seen user whom the two rings
            # place apart: created on the old node, such a user would miss the move.
            _set_lists(admins, old, following=new)
            # Users created before that (since the plan's survey, or while a failed run had
            # cleared it) join the move: asked again now that no node creates more of them.
            _add_moves(state, compute_plan(old, new, survey(old, admin_key)))
            _pass_one(state, admins, report, options)
            if report.failed:
                return _failed(state, holds, report, out, started, admins, old)
            state.save(HOLD)
            _notify(options, "pass1")
            step = HOLD
        if step == HOLD:
            holds.hold_all(list(moves))
            _notify(options, "hold")
            _pass_two(state, admins, report, options)
            if report.failed:
                if router_touched:
                    raise OperationError(
                        "a copy failed after the router was switched: "
                        + "; ".join(f"{u}: {w}" for u, w in sorted(report.failed.items()))
                    )
                return _failed(state, holds, report, out, started, admins, old)
            _carry_user_state(state, admins)
            holds.check()
            router_touched = True
            state.doc["routerTouched"] = True
            state.save()
            try:
                switch_router(options.router_config, router_text, options.reload_command, out)
            except RouterRestoredError:
                state.doc["routerTouched"] = router_touched = False  # routes as before
                state.save()
                raise
            state.save(SWITCH)
            _notify(options, "router")
            step = SWITCH
        if step == SWITCH:
            for user in moves:
                holds.since.setdefault(user, time.monotonic())
            _switch(state, admins, old, new)
            holds.finish()
            for move in moves.values():
                move["phase"] = "moved"
            state.save(DONE)
    except OperationError as exc:
        report.failed.setdefault("*", str(exc))
        if step != SWITCH and not (router_touched and state.doc.get("routerTouched")):
            return _failed(state, holds, report, out, started, admins, old)
        raise
    except BaseException:
        # Interrupted (Ctrl-C, or a fault of this process) before the router was touched: the
        # users were copied from, not moved; release them now rather than after the holds'
        # TTL.  The step and the announcement stay: run the command again to go on.
        if step != SWITCH and not router_touched and holds.since:
            print(f"interrupted: releasing {len(holds.since)} held users", file=sys.stderr)
            holds.release_all()
        raise
    report.held_s.update(holds.held_s)
    report.moved = sorted(moves)
    report.seconds = time.monotonic() - started
    _summary(report, new, out)
    return report


def _views(admins: dict[str, NodeAdmin]) -> dict[str, dict[str, Any]]:
    """``GET /admin/cluster`` of every node (`Placement.view`).  Raises OperationError."""
    return {node: admin.request("GET", "/admin/cluster") for node, admin in admins.items()}


def _stranded(
    views: dict[str, dict[str, Any]], found: dict[str, list[dict[str, Any]]]
) -> list[tuple[str, str, str]]:
    """(source, user, target) of every user a source has closed (``moved``) for a target that
    does not serve them (``home``) — a move that did not finish: the user is served nowhere,
    and a plan skips them (a ``moved`` entry is not data).  Targets not in ``found`` are not
    judged."""
    placement = {
        node: {str(u["userId"]): u.get("placement", "home") for u in users}
        for node, users in found.items()
    }
    stranded = []
    for node, view in views.items():
        for user, target in view.get("moved", {}).items():
            if target in placement and placement[target].get(user) != "home":
                stranded.append((node, user, target))
    return sorted(stranded)


def _refuse_unfinished(
    nodes: list[str], admin_key: str, found: dict[str, list[dict[str, Any]]]
) -> None:
    """Raise RebalanceRefused when ``nodes`` (their users: ``found``, `survey`) show a run that
    did not finish (found in review: a new run's plan skipped the users a killed run had
    closed, and its switch then sent them to an empty database): a change announced
    (``next``), or users closed on a source whose target does not serve them."""
    views = _views({n: NodeAdmin(n, admin_key) for n in nodes})
    problems = [
        f"{node} has a change under way to {','.join(view['next'])}"
        for node, view in views.items()
        if view.get("next")
    ]
    problems += [
        f"{user} is closed on {node} (moving to {target}) and {target} does not serve it"
        for node, user, target in _stranded(views, found)
    ]
    # Closed for a node outside this run: not asked (only the nodes named get the key).
    problems += [
        f"{user} is closed on {node} for {target}, which this run does not include (finish or "
        "abort that run, or remove the old copy with `stcs cluster cleanup --nodes` naming it)"
        for node, view in views.items()
        for user, target in view.get("moved", {}).items()
        if target not in nodes
    ]
    if problems:
        shown = "; ".join(problems[:10]) + (
            f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        )
        raise RebalanceRefused(
            f"an earlier run did not finish: {shown}. Run it again (its --from, --to and "
            "--state) to finish it, or undo it with the same command and --abort"
        )


def abort(
    old: list[str],
    new: list[str],
    admin_key: str,
    settings: Settings,
    options: RebalanceOptions,
    out: IO[str],
) -> None:
    """Undo a run of ``old`` -> ``new`` that stopped before its router switch, from what the
    nodes show (the state file, when there is one, only refuses a run that touched the
    router): every user closed on a source for a target that does not serve them is opened
    again (``home``), and every node announcing this change (``next`` = ``new``) gets ``old``
    and no announcement; the state file is removed.  Targets keep their partial copies,
    marked ``arriving`` (never served; a later run copies over them).  Raises RebalanceRefused
    (the router routes ``new``, or the run recorded touched it: run it again to finish) and
    OperationError (a node did not answer or refused: nothing is removed; run again)."""
    state = RunState.load(options.state_path, old, new)
    if state is not None and (state.step in (SWITCH, DONE) or state.doc.get("routerTouched")):
        raise RebalanceRefused(
            f"the run recorded in {options.state_path} has switched the router "
            f"(step {state.step!r}): run the same command again to finish it"
        )
    try:
        _, recorded = read_record(options.router_config.read_text(), settings)
    except (OSError, ConfigError) as exc:
        raise RebalanceRefused(f"--router-config {options.router_config}: {exc}") from None
    if list(recorded.nodes) != old:
        raise RebalanceRefused(
            f"--router-config {options.router_config} routes to {','.join(recorded.nodes)}, "
            "not to --from: the switch happened; run the same command again to finish"
        )
    nodes = list(dict.fromkeys(old + new))
    admins = {n: NodeAdmin(n, admin_key) for n in nodes}
    views = _views(admins)
    stranded = _stranded(views, survey(nodes, admin_key))
    for node, user, _target in stranded:
        admins[node].request("PUT", f"/admin/users/{user}/placement", body={"state": "home"})
    withdrawn = [n for n, view in views.items() if view.get("next") == new]
    for node in withdrawn:
        admins[node].request("PUT", "/admin/cluster", body={"nodes": ",".join(old), "next": ""})
    if state is not None:
        options.state_path.unlink()
    print(
        f"aborted: {len(stranded)} users served by their source nodes again, the change "
        f"withdrawn on {len(withdrawn)} nodes"
        + (f"; {options.state_path} removed" if state is not None else ""),
        file=out,
    )


def _notify(options: RebalanceOptions, step: str) -> None:
    if options.on_step is not None:
        options.on_step(step)


def _copy_each(
    state: RunState,
    admins: dict[str, NodeAdmin],
    report: RebalanceReport,
    opts: RebalanceOptions,
    title: str,
    copy: Callable[[str, dict[str, Any], NodeAdmin, NodeAdmin, Bar], dict[str, Any] | None],
) -> None:
    """A pass over the moves: ``copy(user, move, source, target, bar)`` copies one user and
    returns the fields its move takes (``phase``, ``bytes`` and ``files`` copied, …), or None to
    skip it; a copy that raises OperationError marks the move ``failed`` (`report.failed`).
    The state is saved after each user."""
    moves = state.moves
    bar = progress_bar(0, title, opts.progress)
    try:
        for n, (user, move) in enumerate(moves.items(), 1):
            bar.set_description(f"{title} {n}/{len(moves)}")
            try:
                done = copy(user, move, admins[move["from"]], admins[move["to"]], bar)
            except OperationError as exc:
                move.update(phase="failed", error=str(exc))
                report.failed[user] = str(exc)
            else:
                if done is None:
                    continue
                size, files = done.pop("bytes"), done.pop("files")
                move.update(done)
                move["bytes"] = int(move.get("bytes") or 0) + size
                report.bytes += size
                report.files += files
            state.save()
    finally:
        bar.close()


def _pass_one(
    state: RunState, admins: dict[str, NodeAdmin], report: RebalanceReport, opts: RebalanceOptions
) -> None:
    def copy(
        user: str, move: dict[str, Any], src: NodeAdmin, dst: NodeAdmin, bar: Bar
    ) -> dict[str, Any] | None:
        if move["phase"] == "copied":
            return None
        _check_target(dst, user)
        dst.request("PUT", f"/admin/users/{user}/placement", body={"state": "arriving"})
        manifest, size, files = copy_pass(src, dst, user, bar)
        return {
            "phase": "copied",
            "takenAtNs": manifest["takenAtNs"],
            "error": None,
            "bytes": size,
            "files": files,
        }

    _copy_each(state, admins, report, opts, "pass 1 (live)", copy)


def _check_target(dst: NodeAdmin, user: str) -> None:
    """Raise OperationError when ``dst`` serves ``user`` with data of its own (a copy the plan
    could not see: the new node is not surveyed): it is never overwritten.  An ``arriving``
    copy (ours, partial) or a ``moved`` one (stale, from an earlier move) is."""
    try:
        found = dst.request("GET", f"/admin/users/{user}/manifest")
    except OperationError as exc:
        if " 404 " in str(exc):
            return
        raise
    if found.get("placement") == "home" and found.get("files"):
        raise OperationError(
            f"{dst.node} already serves {user} with {len(found['files'])} files of its own: "
            "keep one copy first (mark it arriving there to have it replaced)"
        )


def _pass_two(
    state: RunState, admins: dict[str, NodeAdmin], report: RebalanceReport, opts: RebalanceOptions
) -> None:
    def copy(
        user: str, move: dict[str, Any], src: NodeAdmin, dst: NodeAdmin, bar: Bar
    ) -> dict[str, Any]:
        taken = move.get("takenAtNs")
        since = 0 if taken is None else int(taken) - RECENT_NS  # 0: every file again
        manifest, size, files = copy_pass(src, dst, user, bar, since)
        return {
            "phase": "held-copied",
            "manifest": _user_state(manifest),
            "bytes": size,
            "files": files,
        }

    _copy_each(state, admins, report, opts, "pass 2 (closed)", copy)


def _user_state(manifest: dict[str, Any]) -> dict[str, Any]:
    return {"blocked": bool(manifest.get("blocked")), "limits": manifest.get("limits") or {}}


def _carry_user_state(state: RunState, admins: dict[str, NodeAdmin]) -> None:
    """The source's blocklist entry and limit overrides (as pass 2's manifest gave them, taken
    with the source closed) onto the target."""
    for user, move in state.moves.items():
        dst = admins[move["to"]]
        carried = move.get("manifest") or {}
        dst.request("POST" if carried.get("blocked") else "DELETE", f"/admin/users/{user}/block")
        dst.request("PUT", f"/admin/users/{user}/limits", body=carried.get("limits") or {})


def _switch(state: RunState, admins: dict[str, NodeAdmin], old: list[str], new: list[str]) -> None:
    """Sources ``moved``, every node's list ``new``, targets ``home`` (each call idempotent:
    a resumed run repeats them)."""
    for user, move in state.moves.items():
        admins[move["from"]].request(
            "PUT", f"/admin/users/{user}/placement", body={"state": "moved", "to": move["to"]}
        )
    _set_lists(admins, new)
    for user, move in state.moves.items():
        admins[move["to"]].request("PUT", f"/admin/users/{user}/placement", body={"state": "home"})


def _set_lists(
    admins: dict[str, NodeAdmin], nodes: list[str], following: list[str] | None = None
) -> None:
    """Every node of the run (``--from`` and ``--to``): its node list ``nodes`` and the list of
    the change under way, ``following`` (None: cleared).  Raises OperationError."""
    body = {"nodes": ",".join(nodes), "next": ",".join(following or [])}
    for node, admin in admins.items():
        view = admin.request("PUT", "/admin/cluster", body=body)
        if view.get("nodes") != nodes or view.get("next") != (following or []):
            raise OperationError(
                f"{node} did not take the node list {body} (it answers {view.get('nodes')}, "
                f"next {view.get('next')}): is its clusterNodes being changed?"
            )


def _failed(
    state: RunState,
    holds: Holds,
    report: RebalanceReport,
    out: IO[str],
    started: float,
    admins: dict[str, NodeAdmin],
    old: list[str],
) -> RebalanceReport:
    holds.release_all()
    try:  # no change under way any more: never-seen users are created as before
        _set_lists(admins, old)
    except OperationError as exc:
        print(f"warning: {exc} (never-seen users that would move are refused there)", file=out)
    report.held_s.update(holds.held_s)
    state.doc["failures"] = dict(report.failed)
    state.save(COPY)  # a rerun copies again (the users served meanwhile)
    report.exit_code = 1
    report.seconds = time.monotonic() - started
    for user, why in sorted(report.failed.items()):
        print(f"failed: {user}: {why}", file=out)
    print(
        "nothing switched: every user is served by its source node as before (targets keep "
        f"partial copies marked arriving). Fix the cause and run again ({state.path}).",
        file=out,
    )
    return report


def _print_steps(plan: Plan, options: RebalanceOptions, out: IO[str]) -> None:
    print(
        f"""
would run (state in {options.state_path}):
  1. mark {len(plan.moves)} users arriving on their targets; copy them live (pass 1)
  2. close them on their sources (marked moved); copy what changed (pass 2)
  3. carry blocklist entries and limit overrides
  4. render {options.router_config} for {",".join(plan.new)} (previous kept as .prev); run:
     {options.reload_command}
  5. sources: moved; every node's list: {",".join(plan.new)}; targets: home; release holds""",
        file=out,
    )


def _summary(report: RebalanceReport, new: list[str], out: IO[str]) -> None:
    print(
        f"moved {len(report.moved)} users, {report.bytes / 2**20:.1f} MB in {report.files} "
        f"files, in {report.seconds:.1f} s; held p50 {report.held_p50_s:.2f} s, "
        f"max {report.held_max_s:.2f} s",
        file=out,
    )
    print(
        "old copies stay on the source nodes (refused there) until `stcs cluster cleanup "
        f"--nodes ...`; put clusterNodes: {shlex.quote(','.join(new))} in every node's "
        "config.yml (the nodes use it already, until their clusterNodes changes)",
        file=out,
    )


# -- cleanup ----------------------------------------------------------------------------------


@dataclass
class CleanupReport:
    """``removed``: (node, user) old copies deleted (or, dry run, that would be);
    ``skipped``: (node, user, why)."""

    removed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)


def cleanup(
    nodes: list[str], admin_key: str, dry_run: bool = False, out: IO[str] = sys.stdout
) -> CleanupReport:
    """Delete each old copy (a user marked ``moved`` on a node) whose new node — one of
    ``nodes`` — lists the user as ``home`` (``DELETE /admin/users/{userId}/data``); others are
    skipped with a warning (a new node not in ``nodes`` is not asked).
    Raises OperationError for a node in ``nodes`` that does not answer."""
    report = CleanupReport()
    found = survey(nodes, admin_key)
    admins = {n: NodeAdmin(n, admin_key) for n in nodes}
    for node in nodes:
        gone = [u["userId"] for u in found[node] if u.get("placement") == "moved"]
        if not gone:
            continue
        went = admins[node].request("GET", "/admin/cluster").get("moved", {})
        for user in gone:
            to = str(went.get(user, ""))
            # Only nodes the operator named are asked (with the admin key): the address a node
            # reports is not trusted with it.
            if to not in found:
                found[to] = []
            if not any(u["userId"] == user and u.get("placement") == "home" for u in found[to]):
                why = (
                    f"its new node {to or '(unknown)'} does not serve it"
                    if to in nodes
                    else f"its new node {to or '(unknown)'} is not among --nodes"
                )
                report.skipped.append((node, user, why))
                print(f"warning: kept {user} on {node}: {why}", file=sys.stderr)
                continue
            if not dry_run:
                admins[node].request("DELETE", f"/admin/users/{user}/data")
            report.removed.append((node, user))
            print(
                f"{'would remove' if dry_run else 'removed'} {user} on {node} (now on {to})",
                file=out,
            )
    if not report.removed and not report.skipped:
        print("no old copies", file=out)
    return report
