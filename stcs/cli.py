"""``stcs`` command line.  The only place errors become exit codes.

* ``stcs serve``: run the server (exit 2 on a configuration error or a held ``dbPath`` lock,
  without starting anything).
* ``stcs check-config``: print the resolved settings with their source, secrets masked.

Every setting has a ``--<yamlKey>`` flag; the Node.js server's short forms are kept
(``--port/-p``, ``--auth``, ``--authKey``, ``--db``, ``--ttl``).
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from stcs import __version__
from stcs import cluster as cluster_cli
from stcs.config import BY_KEY, SETTINGS, Resolved, load_settings
from stcs.deploy import KINDS, RenderOptions, render
from stcs.errors import ConfigError, LockHeldError
from stcs.localfiles import PRIVATE_UMASK, check_private_db_path

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

USER_ACTIONS = ("add", "block", "unblock", "hold", "release", "stop", "limits")

# In-flight requests get this long to finish on SIGTERM/SIGINT before children are stopped (s).
SHUTDOWN_GRACE_S = 10.0


def _settings_parser() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config",
        metavar="PATH",
        help="YAML configuration file (default ./config.yml when it exists)",
    )
    group = parent.add_argument_group("settings (override config.yml and the environment)")
    for info in SETTINGS:
        kwargs: dict[str, object] = {
            "dest": f"setting:{info.key}",
            "default": None,
            # argparse %-formats help text (for %(default)s): a literal % must be doubled.
            "help": f"{info.help} [{info.env}]".replace("%", "%%"),
        }
        if info.type is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs["metavar"] = info.unit.upper() or info.type.__name__.upper()
        group.add_argument(f"--{info.key}", *info.aliases, **kwargs)  # type: ignore[arg-type]
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stcs", description="Single-tenant Chroma server: one chroma server per user."
    )
    parser.add_argument("--version", action="version", version=f"stcs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    settings = _settings_parser()
    sub.add_parser("serve", parents=[settings], help="run the server")
    check = sub.add_parser(
        "check-config",
        parents=[settings],
        help="print the resolved settings and where each comes from",
    )
    check.add_argument("--get", metavar="KEY", help="print only this setting's value (raw)")
    render = sub.add_parser(
        "render",
        parents=[settings],
        help="print a deployment file rendered from the settings",
        description="Render an nginx/Apache site, the nginx cluster router, the systemd unit "
        "or the nftables rule letting only stcs's user reach the children (childPortRange).",
    )
    render.add_argument("kind", choices=sorted(KINDS))
    render.add_argument("--listen", default="80", help="front server address (default 80)")
    render.add_argument("--tls-listen", default="443", help="TLS address (default 443)")
    render.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a stcs node (nginx-cluster; repeat for each)",
    )
    render.add_argument(
        "--admin-from",
        action="append",
        default=[],
        metavar="CIDR",
        help="route /admin-health, /admin/* and /metrics for this network (nginx, apache; "
        "repeat for each; default: for no one, 404)",
    )
    render.add_argument(
        "--user", default="stcs", help="service user: name or uid (systemd, nftables)"
    )
    render.add_argument("--stcs-bin", default="/opt/stcs/venv/bin/stcs", help="(systemd)")
    render.add_argument("--config-path", default="/etc/stcs/config.yml", help="(systemd)")
    render.add_argument("--working-dir", default="/var/lib/stcs", help="(systemd)")
    render.add_argument("--source-dir", default="/opt/stcs/src", help="(systemd)")
    render.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write here instead of stdout (systemd: also its socket unit, FILE's name with "
        ".socket)",
    )
    sub.add_parser(
        "status",
        parents=[settings],
        help="list the running server's instances",
        description="A table of the instances of the stcs running on this machine's appPort "
        "(needs adminAPIKey).",
    )
    cluster_cli.add_parser(sub, settings)
    ref = sub.add_parser(
        "user-ref",
        help="print the reference logged for a user id in UUID mode",
        description="In UUID mode (no authServerEndpoint) the user id is the token, so the log "
        "shows u- + the first 16 hex digits of its SHA-256 instead; this prints it for ID "
        "(a UUID in any case means its lowercase form).",
    )
    _user_arguments(ref, "ID")
    users = sub.add_parser(
        "users",
        parents=[settings],
        help="manage one user: add, block, unblock, hold, release, stop, limits",
        description="add: create ID's directory <dbPath>/<ID> (mode 0700) so that ID is served "
        "when autoCreateUsers is false (no server needed).  The others act through the running "
        "server's admin API (adminAPIKey), as status does: block (403 from now on, their chroma "
        "stopped) / unblock; hold (their chroma stops, their requests wait) / release; stop "
        "(their chroma, after its requests in flight; the next request starts it); limits "
        "(show, or change with --set/--unset/--clear; kept by the server across restarts).",
    )
    users.add_argument("action", choices=USER_ACTIONS)
    _user_arguments(users, "ID")
    users.add_argument(
        "--hold-ttl",
        type=float,
        default=600.0,
        metavar="S",
        help="hold: the hold ends by itself after S seconds (default 600)",
    )
    users.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="block, hold, stop: wait up to S seconds for requests in flight (default 300)",
    )
    users.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=N",
        help="limits: override setting KEY (userMaxDiskMB, ...) for this user; 0 is off; repeat",
    )
    users.add_argument(
        "--unset",
        action="append",
        default=[],
        metavar="KEY",
        help="limits: drop the override of KEY (the setting applies again); repeat",
    )
    users.add_argument(
        "--clear", action="store_true", help="limits: drop every override of this user first"
    )
    for name, verb in (
        ("backup", "write USER's database to ARCHIVE (.tar.gz)"),
        ("restore", "replace USER's database with ARCHIVE"),
    ):
        cmd = sub.add_parser(
            name,
            parents=[settings],
            help=verb,
            description=f"{verb[0].upper()}{verb[1:]}; consistent while stcs runs (the user is "
            "held: their chroma stops and their requests wait for the copy).",
        )
        _user_arguments(cmd, "USER")
        cmd.add_argument("archive", metavar="ARCHIVE")
        cmd.add_argument(
            "--all",
            action="store_true",
            help=f"{name} every user, one held at a time; ARCHIVE is then a directory (DIR): "
            "one archive per user, the blocklist and limit overrides, and manifest.json (sizes, "
            "SHA-256) checked on restore"
            + (
                "; a re-run skips users whose archive matches the manifest"
                if name == "backup"
                else ""
            ),
        )
        cmd.add_argument(
            "--force",
            action="store_true",
            help="replace an existing archive (backup; with --all: copy every user again) or "
            "user database (restore)",
        )
        cmd.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _user_arguments(parser: argparse.ArgumentParser, metavar: str) -> None:
    """The user id as a positional argument or ``--user-file``: in UUID mode the id is a token,
    and a command line is shown by ``ps`` to every local user and kept in shell history."""
    parser.add_argument("user", metavar=metavar, nargs="?", help="the user id")
    parser.add_argument(
        "--user-file",
        metavar="FILE",
        help=f"read {metavar} from the first line of FILE ('-': standard input) instead, so "
        "that a token (UUID mode) stays off the command line",
    )


def _read_user_arg(args: argparse.Namespace) -> str | None:
    """``args.user`` from the command line or ``--user-file``; None (after saying why on
    stderr) when neither or both are given or the file names no id."""
    source = getattr(args, "user_file", None)
    if (args.user is None) == (source is None):
        print(
            f"stcs {args.command}: give the user id or --user-file FILE (one of them)",
            file=sys.stderr,
        )
        return None
    if source is None:
        return str(args.user)
    try:
        if source == "-":
            line = sys.stdin.readline()
        else:
            with open(source, encoding="utf-8") as handle:
                line = handle.readline()
    except OSError as exc:
        print(f"stcs {args.command}: --user-file {source}: {exc.strerror}", file=sys.stderr)
        return None
    if not line.strip():
        print(f"stcs {args.command}: --user-file {source}: no user id in it", file=sys.stderr)
        return None
    return line.strip()


def _resolve(args: argparse.Namespace) -> Resolved:
    cli = {
        name.split(":", 1)[1]: value
        for name, value in vars(args).items()
        if name.startswith("setting:") and value is not None
    }
    return load_settings(cli=cli, config_path=args.config)


def _check_config(resolved: Resolved) -> int:
    rows = resolved.describe()
    width_key = max(len(r[0]) for r in rows)
    width_val = min(60, max(len(r[1]) for r in rows))
    for key, value, source in rows:
        print(f"{key:<{width_key}}  {value:<{width_val}}  {source}")
    for notice in resolved.notices:
        print(f"notice: {notice}")
    return EXIT_OK


def _ssl_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def _serve(resolved: Resolved, load: Callable[[], Resolved] | None = None) -> int:
    """Run the server; ``load`` reads the configuration again from the same sources (SIGHUP)."""
    # Imported here: `check-config` and `--help` stay fast and need no aiohttp.
    import structlog

    from stcs import log as log_mod
    from stcs.activation import listen_sockets
    from stcs.server import serve

    settings = resolved.settings
    try:  # first: the LISTEN_* variables leave the environment before anything is spawned
        sockets = listen_sockets()
    except ConfigError as exc:
        print(f"stcs: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not settings.allow_shared_db_path:
        try:
            check_private_db_path(settings.db_dir)
        except ConfigError as exc:
            print(f"stcs: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        log_mod.configure(
            settings.log_level,
            settings.log_file,
            user_ids_are_secret=settings.user_ids_are_secret,
        )
    except OSError as exc:
        print(f"stcs: error: logFile {settings.log_file}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    log = structlog.get_logger("stcs")
    ssl_context = None
    if settings.app_tls:
        try:
            ssl_context = _ssl_context(settings.ssl_cert_file, settings.ssl_cert_key_file)
        except (OSError, ssl.SSLError) as exc:
            print(f"stcs: error: cannot load sslCertFile/sslCertKeyFile: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if settings.auth_server_ca_file:
        from stcs.auth import tls_context

        try:
            tls_context(settings.auth_server_ca_file)
        except (OSError, ssl.SSLError) as exc:
            print(f"stcs: error: cannot load authServerCAFile: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        loop_name, run = _event_loop(settings.event_loop)
    except ImportError:
        print("stcs: error: eventLoop uvloop: uvloop is not installed", file=sys.stderr)
        return EXIT_USAGE
    for notice in resolved.notices:
        log.info("config notice", notice=notice)
    scheme = "https" if ssl_context else "http"
    log.info(
        "stcs starting",
        version=__version__,
        url=f"{scheme}://{settings.listen_host}:{settings.app_port}",
        db_path=str(settings.db_dir),
        auth="auth server" if settings.auth_server_endpoint else "uuid tokens",
        launcher=settings.chroma_command or "lean",
        db_ttl_ms=settings.db_ttl,
        db_max_instances=settings.db_max_instances,
        event_loop=loop_name,
    )
    try:
        run(
            serve(
                settings,
                host=settings.listen_host,
                port=settings.app_port,
                ssl_context=ssl_context,
                grace_s=SHUTDOWN_GRACE_S,
                sockets=sockets,
                load=load,
            )
        )
    except (LockHeldError, ConfigError) as exc:  # ConfigError: childPortRange vs open files
        log.error("cannot start", reason=str(exc))
        print(f"stcs: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        log.error("cannot listen", error=str(exc))
        print(
            f"stcs: error: cannot listen on {settings.listen_host}:{settings.app_port}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    log.info("stcs stopped")
    return EXIT_OK


def _event_loop(choice: str) -> tuple[str, Callable[[Coroutine[Any, Any, None]], None]]:
    """The ``eventLoop`` setting as (name, function running the server's coroutine to its end).

    Raises ImportError when ``choice`` is ``uvloop`` and it is not installed.
    """
    import asyncio

    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return "uvloop", uvloop.run
    return "asyncio", asyncio.run


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stcs`` console script; returns the exit code."""
    # Everything stcs creates, from any subcommand — dbPath, .stcs, logs, user directories,
    # locks, blocked.json, logFile, archives, and the children's own files (they inherit it) —
    # is private to its uid whatever the shell's umask (docs/security.md, "A local user"): in
    # UUID mode a directory or file name is a token.  `stcs render -o` chooses its own mode.
    os.umask(PRIVATE_UMASK)
    args = build_parser().parse_args(argv)
    if getattr(args, "all", False):
        if args.user is not None or args.user_file is not None:
            print(f"stcs {args.command} --all: no user id with --all", file=sys.stderr)
            return EXIT_USAGE
    elif hasattr(args, "user_file"):
        user = _read_user_arg(args)
        if user is None:
            return EXIT_USAGE
        args.user = user
    if args.command == "user-ref":
        return _user_ref(args.user)
    try:
        resolved = _resolve(args)
    except ConfigError as exc:
        print(f"stcs: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "check-config":
        if args.get:
            return _get_setting(resolved, args.get)
        return _check_config(resolved)
    if args.command == "render":
        return _render(resolved, args)
    if args.command == "cluster":
        return cluster_cli.main(resolved, args)
    makes_user_dir = args.command == "restore" or (args.command == "users" and args.action == "add")
    if makes_user_dir and not resolved.settings.allow_shared_db_path:
        try:  # they make a directory named by the user id (a token in UUID mode)
            check_private_db_path(resolved.settings.db_dir, owner_too=False)
        except ConfigError as exc:
            print(f"stcs {args.command}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.command == "users":
        if args.action == "add":
            return _users_add(resolved, args.user)
        return _users_admin(resolved, args)
    if args.command in ("status", "backup", "restore"):
        return _maintenance(resolved, args)
    return _serve(resolved, lambda: _resolve(args))


def _maintenance(resolved: Resolved, args: argparse.Namespace) -> int:
    from stcs import backup as backup_mod

    settings = resolved.settings
    progress = False if getattr(args, "no_progress", False) else None
    try:
        if args.command == "status":
            _print_status(backup_mod.status(settings))
            return EXIT_OK
        if args.all:
            return _backup_set(resolved, args, progress)
        fn = backup_mod.backup if args.command == "backup" else backup_mod.restore
        report = fn(settings, args.user, Path(args.archive), force=args.force, progress=progress)
    except backup_mod.OperationError as exc:
        print(f"stcs {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    done = "backed up" if args.command == "backup" else "restored"
    print(
        f"{done} {args.user}: {report.files} files, {report.bytes / 2**20:.1f} MB "
        f"in {report.seconds:.1f} s"
    )
    return EXIT_OK


def _backup_set(resolved: Resolved, args: argparse.Namespace, progress: bool | None) -> int:
    """``backup --all DIR`` / ``restore --all DIR``: a line per user (by reference in UUID
    mode: this output may go to a journal), then the totals and the longest hold."""
    from stcs import backupset
    from stcs.backup import OperationError
    from stcs.useradmin import shown

    settings = resolved.settings
    verb = "backup" if args.command == "backup" else "restore"

    def said(user: backupset.UserResult) -> None:
        name = shown(settings, user.user_id)
        if user.skipped:
            print(f"{name}: skipped (its archive matches the manifest)", flush=True)
        else:
            print(
                f"{name}: {user.files} files, {user.data_bytes / 2**20:.1f} MB, "
                f"held {user.held_s * 1000:.0f} ms",
                flush=True,
            )

    fn = backupset.backup_all if verb == "backup" else backupset.restore_all
    try:
        report = fn(settings, Path(args.archive), force=args.force, progress=progress, on_user=said)
    except OperationError as exc:
        print(f"stcs {args.command} --all: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    done = report.done
    holds = sorted(u.held_s for u in done)
    longest = f"; holds: median {holds[len(holds) // 2] * 1000:.0f} ms, longest " if holds else ""
    if holds:
        longest += f"{holds[-1] * 1000:.0f} ms"
    mb = sum(u.data_bytes for u in done) / 2**20
    skipped = len(report.users) - len(done)
    print(
        f"{'backed up' if verb == 'backup' else 'restored'} {len(done)} users "
        f"({skipped} skipped), {mb:.1f} MB in {report.seconds:.1f} s{longest}"
    )
    return EXIT_OK


def _print_status(instances: list[dict[str, object]]) -> None:
    if not instances:
        print("no instances running")
        return
    header = ("USER", "PID", "PORT", "RSS MB", "DISK MB", "IDLE", "REQUESTS", "IN FLIGHT", "STATUS")
    rows = [
        (
            str(i["userId"]),
            str(i["pid"]),
            str(i["port"]),
            f"{int(i['memKb'] or 0) / 1000:.1f}",  # type: ignore[call-overload]
            _disk_cell(i),
            f"{int(i['idleForMs']) / 1000:.1f}s",  # type: ignore[call-overload]
            str(i["requests"]),
            str(i["inFlight"]),
            str(i["status"]),
        )
        for i in instances
    ]
    widths = [max(len(r[n]) for r in (header, *rows)) for n in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _disk_cell(instance: dict[str, object]) -> str:
    """``USED/LIMIT`` in MB (MiB, as userMaxDiskMB): ``-`` not measured yet, no ``/LIMIT``
    without a disk limit."""
    usage, limits = instance.get("usage"), instance.get("limits")
    used = usage.get("diskBytes") if isinstance(usage, dict) else None
    limit = limits.get("userMaxDiskMB") if isinstance(limits, dict) else None
    cell = "-" if used is None else f"{used / 2**20:.1f}"
    return f"{cell}/{limit}" if limit else cell


def _parse_overrides(pairs: Sequence[str]) -> dict[str, int] | None:
    """``KEY=N`` pairs as ``{KEY: N}``; None (after saying why on stderr) when one is not of
    that form.  Keys and ranges are the server's to check (one definition, `stcs.quotas`)."""
    out: dict[str, int] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            if not sep or not key:
                raise ValueError
            out[key] = int(value)
        except ValueError:
            print(f"stcs users limits: --set {pair!r}: expected KEY=N", file=sys.stderr)
            return None
    return out


def _users_admin(resolved: Resolved, args: argparse.Namespace) -> int:
    """``stcs users block|unblock|hold|release|stop|limits``: exit 0 done, 1 refused or no
    server (as status, backup), 2 a bad id or usage."""
    from stcs import useradmin
    from stcs.backup import OperationError
    from stcs.errors import InvalidUserIdError

    settings = resolved.settings
    action = args.action
    set_keys = _parse_overrides(args.set)
    if set_keys is None:
        return EXIT_USAGE
    if action != "limits" and (args.set or args.unset or args.clear):
        print(f"stcs users {action}: --set/--unset/--clear go with limits", file=sys.stderr)
        return EXIT_USAGE
    try:
        user_id = useradmin.normalized(settings, args.user)
        name = useradmin.shown(settings, user_id)
        drain = args.drain_timeout
        if action in ("block", "unblock"):
            answer = useradmin.set_blocked(settings, user_id, action == "block", drain)
            said = f"{action}ed {name}"
            if answer.get("stopped"):
                said += " (their chroma stopped)"
            elif answer.get("message"):
                said += f" ({answer['message']})"
            print(said)
        elif action == "hold":
            answer = useradmin.hold(settings, user_id, args.hold_ttl, drain)
            print(f"held {name} for at most {args.hold_ttl:g} s (release: stcs users release)")
        elif action == "release":
            useradmin.release(settings, user_id)
            print(f"released {name}")
        elif action == "stop":
            useradmin.stop(settings, user_id, drain)
            print(f"stopped {name}'s chroma")
        else:
            doc = useradmin.limits(
                settings, user_id, set_keys=set_keys, unset_keys=tuple(args.unset), clear=args.clear
            )
            _print_limits(doc)
    except InvalidUserIdError:
        print(f"stcs users {action}: {args.user!r} is not a valid user id", file=sys.stderr)
        return EXIT_USAGE
    except OperationError as exc:
        print(f"stcs users {action}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _print_limits(doc: dict[str, Any]) -> None:
    """``KEY  LIMIT  OVERRIDDEN`` (0: off), then the usage the limits are checked against."""
    overrides = doc.get("overrides") or {}
    rows = [("LIMIT", "VALUE", "SOURCE")] + [
        (key, str(value), "override" if key in overrides else "setting")
        for key, value in sorted((doc.get("limits") or {}).items())
    ]
    widths = [max(len(r[n]) for r in rows) for n in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    usage = doc.get("usage") or {}
    disk = usage.get("diskBytes")
    disk_mb = "not measured" if disk is None else f"{disk / 2**20:.1f} MB"
    print(f"usage: disk {disk_mb}, {usage.get('inFlight', 0)} requests in flight")


def _users_add(resolved: Resolved, user_id: str) -> int:
    from stcs.auth import create_user, normalize_user_id
    from stcs.errors import InvalidUserIdError

    settings = resolved.settings
    try:
        user_id = normalize_user_id(user_id, uuid_mode=settings.user_ids_are_secret)
        created = create_user(settings.db_dir, user_id)
    except InvalidUserIdError:
        print(f"stcs: {user_id!r} is not a valid user id", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"stcs users add: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{'created' if created else 'exists'}: {settings.db_dir / user_id}")
    return EXIT_OK


def _user_ref(user_id: str) -> int:
    from stcs.auth import normalize_user_id
    from stcs.errors import InvalidUserIdError
    from stcs.log import user_ref

    try:
        user_id = normalize_user_id(user_id, uuid_mode=True)
    except InvalidUserIdError:
        print(f"stcs: {user_id!r} is not a valid user id", file=sys.stderr)
        return EXIT_USAGE
    print(user_ref(user_id))
    return EXIT_OK


def _get_setting(resolved: Resolved, key: str) -> int:
    info = BY_KEY.get(key)
    if info is None:
        print(f"stcs: unknown setting {key!r}", file=sys.stderr)
        return EXIT_USAGE
    value = getattr(resolved.settings, info.name)
    print(("true" if value else "false") if isinstance(value, bool) else value)
    return EXIT_OK


def _render(resolved: Resolved, args: argparse.Namespace) -> int:
    options = RenderOptions(
        listen=args.listen,
        tls_listen=args.tls_listen,
        nodes=tuple(args.node),
        admin_from=tuple(args.admin_from),
        user=args.user,
        stcs_bin=args.stcs_bin,
        config_path=args.config_path,
        working_dir=args.working_dir,
        source_dir=args.source_dir,
    )
    try:
        text = render(args.kind, resolved.settings, options)
        socket_text = (
            render("systemd-socket", resolved.settings, options)
            if args.kind == "systemd" and args.output
            else ""
        )
    except ConfigError as exc:
        print(f"stcs: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.output:
        # 0644 whatever the umask: a rendered site, unit or ruleset holds no secret (paths,
        # host names, ports; keys stay in config.yml), and programs other than its writer read
        # it — nginx/Apache workers for `include`d files, `systemctl cat`, `nginx -t` run by a
        # non-root operator, configuration management.  As /etc's own files are.
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        if socket_text:  # the service's socket unit beside it: same name, .socket
            socket_path = Path(args.output).with_suffix(".socket")
            fd = os.open(socket_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.fchmod(fd, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(socket_text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
