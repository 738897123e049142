"""Settings: defined once, resolved in one place, validated, no side effects.

Each setting is a field of the frozen `Settings` dataclass whose metadata gives its YAML key
(the Node.js single-tenant-chroma-server's camelCase name), environment name, command-line
aliases, unit and help text.  `config.sample.yml` and the README table are checked against
these fields by a test.

Sources, first wins (as the Node.js server): command line > ``config.yml`` > environment >
default.  Times are in milliseconds, sizes in bytes unless the name says MB.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from stcs.errors import ConfigError

DEFAULT_CONFIG_FILE = "config.yml"
MIB = 1024 * 1024

# Node.js-server keys with no meaning for stcs: accepted and ignored with a one-line notice.
IGNORED_KEYS = ("compileFromSource", "nodeVersion", "pythonVersion")

LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "fatal", "critical")
WEB_SERVER_TYPES = ("", "apache", "nginx")
EVENT_LOOPS = ("auto", "uvloop", "asyncio")

Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def setting(
    default: Any,
    *,
    key: str,
    reloadable: bool,
    env: str,
    help: str,
    unit: str = "",
    aliases: Sequence[str] = (),
    secret: bool = False,
    minimum: int | None = None,
    choices: Sequence[str] | None = None,
    deployment: bool = False,
) -> Any:
    """Declare one setting (a dataclass field carrying its metadata).

    ``reloadable``: whether SIGHUP (`stcs.reload`) applies a new value to the running server;
    False: a change is logged as needing a restart and the running value kept.
    """
    return field(
        default=default,
        metadata={
            "key": key,
            "env": env,
            "help": help,
            "unit": unit,
            "aliases": tuple(aliases),
            "secret": secret,
            "minimum": minimum,
            "choices": tuple(choices) if choices is not None else None,
            "deployment": deployment,
            "reloadable": reloadable,
        },
    )


@dataclass(frozen=True)
class Settings:
    """The resolved configuration of one stcs process.  Build it with `load_settings`."""

    app_port: int = setting(
        8000,
        key="appPort",
        reloadable=False,
        env="APP_PORT",
        aliases=("--port", "-p"),
        minimum=1,
        help="TCP port stcs listens on.",
    )
    bind_to_localhost: bool = setting(
        True,
        key="bindToLocalhost",
        reloadable=False,
        env="BIND_LOCALHOST",
        help="Listen on 127.0.0.1 only (false: all interfaces). Ignored inside Docker (useDocker).",
    )
    auth_server_endpoint: str = setting(
        "",
        key="authServerEndpoint",
        reloadable=True,
        env="AUTH_SERVER_ENDPOINT",
        aliases=("--auth",),
        help="URL stcs GETs with `Authorization: Bearer <token>` to resolve a token; it answers "
        "`{userId}` or `{data: {userId}}`. Empty: the token must be a UUID and is the user id.",
    )
    auth_server_api_key: str = setting(
        "",
        key="authServerAPIKey",
        reloadable=True,
        env="AUTH_SERVER_APIKEY",
        aliases=("--authKey",),
        secret=True,
        help="Sent to the auth server as `x-api-key`, if set.",
    )
    auth_server_ca_file: str = setting(
        "",
        key="authServerCAFile",
        reloadable=False,
        env="AUTH_SERVER_CA_FILE",
        help="PEM CA bundle to verify an https authServerEndpoint with. Empty: the system's CAs.",
    )
    auth_max_concurrent_lookups: int = setting(
        32,
        key="authMaxConcurrentLookups",
        reloadable=False,
        env="AUTH_MAX_CONCURRENT_LOOKUPS",
        minimum=1,
        help="Most auth-server lookups in flight at once; beyond, a lookup waits (within "
        "authTimeout, then 503). Cached tokens, /health and admin calls never wait.",
    )
    auth_max_lookups_per_address: int = setting(
        8,
        key="authMaxLookupsPerAddress",
        reloadable=True,
        env="AUTH_MAX_LOOKUPS_PER_ADDRESS",
        minimum=0,
        help="Most auth-server lookups in flight begun by one client address (the "
        "`trustedProxies` rule); beyond, 429 `RateLimitError` with `Retry-After: 1` at once. "
        "0: no limit.",
    )
    cluster_nodes: str = setting(
        "",
        key="clusterNodes",
        reloadable=True,
        env="CLUSTER_NODES",
        help="Cluster: every node as `HOST:PORT`, comma-separated, exactly as the router's "
        "upstream block names them (`stcs render nginx-cluster --node`). A user new to this "
        "node is started only if nginx's consistent hash over this list gives them to "
        "`clusterSelf`. Empty: not a cluster.",
    )
    cluster_self: str = setting(
        "",
        key="clusterSelf",
        reloadable=True,
        env="CLUSTER_SELF",
        help="Cluster: this node's entry in `clusterNodes`.",
    )
    auto_create_users: bool = setting(
        True,
        key="autoCreateUsers",
        reloadable=False,
        env="AUTO_CREATE_USERS",
        help="A user's directory is created at their first request (as the Node.js server). "
        "false: only users whose directory exists (`stcs users add`, `PUT /admin/users/{id}`) "
        "are served; others get 401 before any file is touched.",
    )
    admin_api_key: str = setting(
        "",
        key="adminAPIKey",
        reloadable=True,
        env="ADMIN_API_KEY",
        secret=True,
        help="Key (`x-api-key` header) for `/admin-health`. Empty: admin endpoints answer 404.",
    )
    db_path: str = setting(
        "./chromadb",
        key="dbPath",
        reloadable=False,
        env="DB_PATH",
        aliases=("--db",),
        help="Directory holding one chroma data directory per user (`<dbPath>/<userId>`).",
    )
    allow_shared_db_path: bool = setting(
        False,
        key="allowSharedDbPath",
        reloadable=False,
        env="ALLOW_SHARED_DB_PATH",
        help="Serve a dbPath that group or others can read or enter (or that another uid "
        "owns). false: `stcs serve` refuses one (exit 2): in UUID mode its directory names "
        "are tokens.",
    )
    db_ttl: int = setting(
        180000,
        key="dbTTL",
        reloadable=True,
        env="DB_TTL",
        aliases=("--ttl",),
        unit="ms",
        minimum=1,
        help="An instance with no request in flight for this long is stopped.",
    )
    db_max_instances: int = setting(
        50,
        key="dbMaxInstances",
        reloadable=True,
        env="DB_MAX_INSTANCES",
        minimum=1,
        help="Most chroma servers running at once; beyond, the least recently used idle one is "
        "evicted or the request queues.",
    )
    queue_timeout: int = setting(
        30000,
        key="queueTimeout",
        reloadable=True,
        env="QUEUE_TIMEOUT",
        unit="ms",
        minimum=0,
        help="Longest wait for a free instance slot before 503 with `Retry-After`.",
    )
    address_new_users_per_minute: int = setting(
        10,
        key="addressNewUsersPerMinute",
        reloadable=True,
        env="ADDRESS_NEW_USERS_PER_MINUTE",
        minimum=0,
        help="Starts of never-seen users (no data directory yet) per client address (the "
        "`trustedProxies` rule): a token bucket of this size refilled at this rate; beyond, "
        "429 `RateLimitError` with `Retry-After`, nothing created. 0: no limit.",
    )
    db_max_retries: int = setting(
        2,
        key="dbMaxRetries",
        reloadable=True,
        env="DB_MAX_RETRIES",
        minimum=0,
        help="Retries (each on a new port) when a chroma server exits before it is ready.",
    )
    db_start_timeout: int = setting(
        20000,
        key="dbStartTimeout",
        reloadable=True,
        env="DB_START_TIMEOUT",
        unit="ms",
        minimum=100,
        help="Longest wait for a new chroma server to answer its heartbeat.",
    )
    db_stop_timeout: int = setting(
        10000,
        key="dbStopTimeout",
        reloadable=True,
        env="DB_STOP_TIMEOUT",
        unit="ms",
        minimum=0,
        help="Grace between SIGTERM and SIGKILL when stopping a chroma server.",
    )
    db_liveness_timeout: int = setting(
        30000,
        key="dbLivenessTimeout",
        reloadable=False,
        env="DB_LIVENESS_TIMEOUT",
        unit="ms",
        minimum=0,
        help="An instance with requests in flight whose heartbeat has not answered for this "
        "long is killed (SIGKILL; its requests get 502). 0: never.",
    )
    child_port_range: str = setting(
        "",
        key="childPortRange",
        reloadable=False,
        env="CHILD_PORT_RANGE",
        help="Ports (`FIRST-LAST`) chroma children listen on, for a firewall rule that lets "
        "only stcs reach them (`stcs render nftables`). Empty: any free port.",
    )
    db_min_free_memory_mb: int = setting(
        500,
        key="dbMinFreeMemoryMB",
        reloadable=True,
        env="DB_MIN_FREE_MEMORY_MB",
        unit="MB",
        minimum=0,
        help="No new chroma server starts while less memory than this is available.",
    )
    chroma_command: str = setting(
        "",
        key="chromaCommand",
        reloadable=False,
        env="CHROMA_COMMAND",
        help="Executable (with arguments) that serves `run --host --path --port`, e.g. `chroma`. "
        "Empty: the lean launcher (chroma's Rust server without importing chromadb; ~80 ms).",
    )
    event_loop: str = setting(
        "auto",
        key="eventLoop",
        reloadable=False,
        env="EVENT_LOOP",
        choices=EVENT_LOOPS,
        help="Event loop of stcs: uvloop (~5 % more requests/s, docs/benchmarks.md), asyncio's "
        "own, or auto: uvloop when it is installed.",
    )
    relay_fast_path: bool = setting(
        True,
        key="relayFastPath",
        reloadable=False,
        env="RELAY_FAST_PATH",
        help="Serve a request the relay can answer with no wait (whole, small, a known token, a "
        "ready instance, nothing for the quotas to take) in its callbacks instead of a task: "
        "~10 % fewer instructions per request (docs/benchmarks.md). false: every request in a "
        "task, as before; for diagnosis.",
    )
    child_log_dir: str = setting(
        "",
        key="childLogDir",
        reloadable=False,
        env="CHILD_LOG_DIR",
        help="Directory of the per-user chroma output files (<userId>.log). "
        "Empty: <dbPath>/.stcs/logs.",
    )
    child_log_max_bytes: int = setting(
        10 * MIB,
        key="childLogMaxBytes",
        reloadable=True,
        env="CHILD_LOG_MAX_BYTES",
        unit="bytes",
        minimum=1024,
        help="A user's chroma output file is cut back to its last half when it passes this.",
    )
    child_log_retention: int = setting(
        7 * 24 * 3600 * 1000,
        key="childLogRetention",
        reloadable=True,
        env="CHILD_LOG_RETENTION",
        unit="ms",
        minimum=0,
        help="A user's chroma output file (and its .1) is removed once this long has passed "
        "since its last write and the user has no instance (checked by the housekeeping, at "
        "most every minute). 0: kept for ever.",
    )
    auth_cache_ttl: int = setting(
        60000,
        key="authCacheTTL",
        reloadable=True,
        env="AUTH_CACHE_TTL",
        unit="ms",
        minimum=0,
        help="How long an auth server's positive answer is reused (0: never).",
    )
    auth_timeout: int = setting(
        5000,
        key="authTimeout",
        reloadable=True,
        env="AUTH_TIMEOUT",
        unit="ms",
        minimum=1,
        help="Longest wait for the auth server; beyond it the request gets 503.",
    )
    max_body_size: int = setting(
        100 * MIB,
        key="maxBodySize",
        reloadable=True,
        env="MAX_BODY_SIZE",
        unit="bytes",
        minimum=1,
        help="Largest request body passed to chroma; larger gets 413.",
    )
    headers_timeout: int = setting(
        10000,
        key="headersTimeout",
        reloadable=True,
        env="HEADERS_TIMEOUT",
        unit="ms",
        minimum=1,
        help="Longest time a client may take to send a request head (from its first byte, or "
        "from the connection's opening); then 408 and the connection closes. nginx "
        "`client_header_timeout` 60 s, Node.js `headersTimeout` 60 s.",
    )
    body_timeout: int = setting(
        30000,
        key="bodyTimeout",
        reloadable=True,
        env="BODY_TIMEOUT",
        unit="ms",
        minimum=1,
        help="Longest pause between two reads of a request body; then 408, the request's "
        "instance lease is released and the connection closes. nginx `client_body_timeout` 60 s.",
    )
    send_timeout: int = setting(
        30000,
        key="sendTimeout",
        reloadable=True,
        env="SEND_TIMEOUT",
        unit="ms",
        minimum=1,
        help="Longest time a client may leave stcs's answer unread (its buffer full) before the "
        "connection is aborted and the request's lease released. nginx `send_timeout` 60 s.",
    )
    keep_alive_timeout: int = setting(
        75000,
        key="keepAliveTimeout",
        reloadable=True,
        env="KEEP_ALIVE_TIMEOUT",
        unit="ms",
        minimum=1,
        help="An idle keep-alive client connection is closed after this long. nginx "
        "`keepalive_timeout` 75 s (longer than its upstream side's 60 s), Node.js 5 s.",
    )
    max_header_size: int = setting(
        16384,
        key="maxHeaderSize",
        reloadable=True,
        env="MAX_HEADER_SIZE",
        unit="bytes",
        minimum=1024,
        help="Largest request head (request line and all header lines); larger gets 431 and "
        "the connection closes. Node.js `maxHeaderSize` 16 KiB, nginx 4 x 8 KiB buffers.",
    )
    max_headers_count: int = setting(
        100,
        key="maxHeadersCount",
        reloadable=True,
        env="MAX_HEADERS_COUNT",
        minimum=1,
        help="Most header lines in a request; more gets 431. Node.js `maxHeadersCount` 2000, "
        "aiohttp 128.",
    )
    max_connections: int = setting(
        4096,
        key="maxConnections",
        reloadable=True,
        env="MAX_CONNECTIONS",
        minimum=1,
        help="Most client connections open at once; beyond, a new connection gets 503 and is "
        "closed. stcs raises its open-files limit to fit (two fds per proxied connection).",
    )
    # Per-user limits (stcs.quotas): 0 is off; each can be overridden per user through
    # PUT /admin/users/{userId}/limits (kept in <dbPath>/.stcs/limits.json).
    user_max_disk_mb: int = setting(
        0,
        key="userMaxDiskMB",
        reloadable=True,
        env="USER_MAX_DISK_MB",
        unit="MB",
        minimum=0,
        help="A user's data directory size beyond which writes get 422 `QuotaError`: every request "
        "that can store data (collection create and modify, add, upsert, update, fork, tenant "
        "and database creation). Reads, queries and deletes still work. 0: no limit.",
    )
    user_max_collections: int = setting(
        0,
        key="userMaxCollections",
        reloadable=True,
        env="USER_MAX_COLLECTIONS",
        minimum=0,
        help="Collections a user may have, counted in every tenant and database of their chroma; "
        "creating (or forking) one more gets 422 `QuotaError`. 0: no limit.",
    )
    user_max_records_per_collection: int = setting(
        0,
        key="userMaxRecordsPerCollection",
        reloadable=True,
        env="USER_MAX_RECORDS_PER_COLLECTION",
        minimum=0,
        help="Records in one collection; an add/upsert that would take a collection past it (its "
        "ids counted) gets 422 `QuotaError`. 0: no limit.",
    )
    user_requests_per_second: int = setting(
        0,
        key="userRequestsPerSecond",
        reloadable=True,
        env="USER_REQUESTS_PER_SECOND",
        minimum=0,
        help="Sustained requests per second per user (a token bucket); beyond it 429 "
        "`RateLimitError` with `Retry-After`. 0: no limit.",
    )
    user_request_burst: int = setting(
        0,
        key="userRequestBurst",
        reloadable=True,
        env="USER_REQUEST_BURST",
        minimum=0,
        help="Size of a user's token bucket: requests sent at once after a quiet spell (in any 1 "
        "s: burst + userRequestsPerSecond at most). 0: the larger of userRequestsPerSecond "
        "and 10 (a chromadb client costs 3 requests to construct, 6 to its first write).",
    )
    user_max_concurrent_requests: int = setting(
        0,
        key="userMaxConcurrentRequests",
        reloadable=True,
        env="USER_MAX_CONCURRENT_REQUESTS",
        minimum=0,
        help="Requests of one user in flight at once; more wait up to userConcurrencyTimeout, "
        "then 429 `RateLimitError`. 0: no limit.",
    )
    user_concurrency_timeout: int = setting(
        1000,
        key="userConcurrencyTimeout",
        reloadable=True,
        env="USER_CONCURRENCY_TIMEOUT",
        unit="ms",
        minimum=0,
        help="Longest wait for one of the user's userMaxConcurrentRequests slots before 429.",
    )
    user_max_memory_mb: int = setting(
        0,
        key="userMaxMemoryMB",
        reloadable=True,
        env="USER_MAX_MEMORY_MB",
        unit="MB",
        minimum=0,
        help="Memory a user's chroma server may use, as the proportional set size (PSS) of its "
        "process tree, sampled every userMemoryCheckInterval; over it the server is stopped, and "
        "the user's requests get 422 `QuotaError` while their starts back off as after a crash. "
        "0: no limit.",
    )
    user_memory_check_interval: int = setting(
        1000,
        key="userMemoryCheckInterval",
        reloadable=False,
        env="USER_MEMORY_CHECK_INTERVAL",
        unit="ms",
        minimum=100,
        help="How often the memory of instances under a userMaxMemoryMB is sampled (off the "
        "event loop); a user may grow by what their chroma allocates in this time.",
    )
    user_disk_check_interval: int = setting(
        60000,
        key="userDiskCheckInterval",
        reloadable=True,
        env="USER_DISK_CHECK_INTERVAL",
        unit="ms",
        minimum=1000,
        help="How often every user's directory size is measured (off the event loop) for "
        "userMaxDiskMB and the metrics; a user's writes and deletes also trigger it.",
    )
    log_file: str = setting(
        "",
        key="logFile",
        reloadable=False,
        env="LOG_FILE",
        help="File stcs appends its log to. Empty: standard output.",
    )
    log_level: str = setting(
        "info",
        key="logLevel",
        reloadable=True,
        env="LOG_LEVEL",
        choices=LOG_LEVELS,
        help="Least severity logged: trace, debug, info, warn, error or fatal.",
    )
    log_refusals_per_second: int = setting(
        5,
        key="logRefusalsPerSecond",
        reloadable=True,
        env="LOG_REFUSALS_PER_SECOND",
        minimum=0,
        help="Lines a second logged per client address for requests refused before a user is "
        "known (400, 401, 403, 408, 413, 431, ...; bursts of 4 x this, all addresses together "
        "10 x); the others are counted in a `requests not logged` line. 0: log every one.",
    )
    log_refusals_summary_interval: int = setting(
        10000,
        key="logRefusalsSummaryInterval",
        reloadable=True,
        env="LOG_REFUSALS_SUMMARY_INTERVAL",
        unit="ms",
        minimum=100,
        help="The `requests not logged` line (counts by client address and status) is written "
        "this long after the first refusal it counts.",
    )
    enable_ssl: bool = setting(
        False,
        key="enableSSL",
        reloadable=False,
        env="ENABLE_SSL",
        help="Serve HTTPS in-app with sslCertFile/sslCertKeyFile (when no webServerType "
        "terminates TLS in front).",
    )
    ssl_cert_file: str = setting(
        "",
        key="sslCertFile",
        reloadable=False,
        env="SSL_CERT_FILE",
        help="PEM certificate (chain) for TLS.",
    )
    ssl_cert_key_file: str = setting(
        "",
        key="sslCertKeyFile",
        reloadable=False,
        env="SSL_CERT_KEY_FILE",
        help="PEM private key for TLS.",
    )
    trusted_proxies: str = setting(
        "",
        key="trustedProxies",
        reloadable=True,
        env="TRUSTED_PROXIES",
        help="Comma-separated addresses or networks (CIDR) of front proxies whose "
        "X-Forwarded-For is believed for the client address (logs, per-address limits), e.g. "
        "`127.0.0.1`.",
    )
    web_server_type: str = setting(
        "",
        key="webServerType",
        reloadable=False,
        env="WEB_SERVER_TYPE",
        choices=WEB_SERVER_TYPES,
        deployment=True,
        help="Front web server: apache, nginx or empty. When set, it terminates TLS.",
    )
    web_server_host: str = setting(
        "",
        key="webServerHost",
        reloadable=True,
        env="WEB_SERVER_HOST",
        deployment=True,
        help="Host name the front web server serves stcs at.",
    )
    app_name: str = setting(
        "stcs",
        key="appName",
        reloadable=True,
        env="APP_NAME",
        deployment=True,
        help="Name of the service (systemd unit, logs).",
    )
    use_docker: bool = setting(
        False,
        key="useDocker",
        reloadable=False,
        env="USE_DOCKER",
        deployment=True,
        help="Run stcs in a Docker container; it then listens on all interfaces inside it.",
    )
    docker_image_name: str = setting(
        "stcs",
        key="dockerImageName",
        reloadable=True,
        env="DOCKER_IMAGE_NAME",
        deployment=True,
        help="Docker image name (with useDocker).",
    )
    docker_container_name: str = setting(
        "stcs",
        key="dockerContainerName",
        reloadable=True,
        env="DOCKER_CONTAINER_NAME",
        deployment=True,
        help="Docker container name (with useDocker).",
    )

    # -- derived values -------------------------------------------------------------------

    @property
    def listen_host(self) -> str:
        """Address to bind: loopback unless ``bindToLocalhost`` is off or we run in Docker."""
        return "127.0.0.1" if self.bind_to_localhost and not self.use_docker else "0.0.0.0"

    @property
    def app_tls(self) -> bool:
        """Whether stcs itself terminates TLS (a front web server does it when configured)."""
        return self.enable_ssl and not self.web_server_type

    @functools.cached_property  # parsed once: the request line uses it on every request
    def trusted_networks(self) -> Networks:
        """``trustedProxies`` parsed.  Raises ValueError for an entry that is no address."""
        return tuple(
            ipaddress.ip_network(item.strip(), strict=False)
            for item in self.trusted_proxies.split(",")
            if item.strip()
        )

    @functools.cached_property
    def chroma_argv(self) -> list[str]:
        """``chromaCommand`` split into argv (shell-like quoting; empty: the lean launcher).
        Raises ValueError for unbalanced quotes."""
        return shlex.split(self.chroma_command)

    @property
    def resolved_child_log_dir(self) -> Path:
        """Where children's output goes: ``childLogDir``, else ``<dbPath>/.stcs/logs``."""
        if self.child_log_dir:
            return Path(self.child_log_dir).expanduser().resolve()
        from stcs.layout import Layout

        return Layout(self.db_dir).logs_dir

    @functools.cached_property
    def child_ports(self) -> tuple[int, int] | None:
        """``childPortRange`` as (first, last), inclusive; None when empty.  Raises ValueError
        unless it is ``FIRST-LAST`` with 1024 <= FIRST <= LAST <= 65535."""
        text = self.child_port_range.strip()
        if not text:
            return None
        first, sep, last = text.partition("-")
        try:
            low, high = int(first), int(last)
        except ValueError:
            raise ValueError(f"expected FIRST-LAST, e.g. 20000-29999, got {text!r}") from None
        if not sep or not 1024 <= low <= high <= 65535:
            raise ValueError(f"expected FIRST-LAST with 1024 <= FIRST <= LAST <= 65535: {text!r}")
        return low, high

    @property
    def user_ids_are_secret(self) -> bool:
        """UUID mode (no ``authServerEndpoint``): the user id is the token, so logs carry
        `stcs.log.user_ref` of it and child log files are named by it."""
        return not self.auth_server_endpoint

    @property
    def db_dir(self) -> Path:
        """``dbPath`` made absolute (relative to the working directory)."""
        return Path(self.db_path).expanduser().resolve()


@dataclass(frozen=True)
class SettingInfo:
    """One setting's definition, read from the `Settings` field metadata."""

    name: str
    key: str
    env: str
    type: type
    default: Any
    help: str
    unit: str
    aliases: tuple[str, ...]
    secret: bool
    minimum: int | None
    choices: tuple[str, ...] | None
    deployment: bool
    reloadable: bool  # SIGHUP applies it live (`stcs.reload`); False: needs a restart


_TYPES: dict[str, type] = {"int": int, "bool": bool, "str": str}


def setting_infos() -> tuple[SettingInfo, ...]:
    """All settings in declaration order."""
    infos = []
    for f in dataclasses.fields(Settings):
        m = f.metadata
        infos.append(
            SettingInfo(
                name=f.name,
                key=m["key"],
                env=m["env"],
                type=_TYPES[str(f.type)],
                default=f.default,
                help=m["help"],
                unit=m["unit"],
                aliases=m["aliases"],
                secret=m["secret"],
                minimum=m["minimum"],
                choices=m["choices"],
                deployment=m["deployment"],
                reloadable=m["reloadable"],
            )
        )
    return tuple(infos)


SETTINGS: tuple[SettingInfo, ...] = setting_infos()
BY_KEY: dict[str, SettingInfo] = {s.key: s for s in SETTINGS}


@dataclass(frozen=True)
class Resolved:
    """`Settings` plus where each value came from and notices for the operator.

    ``sources`` maps YAML key -> "command line" | "FILE (PATH)" (the config file's name and
    absolute path) | "env NAME" | "default".
    """

    settings: Settings
    sources: dict[str, str]
    notices: tuple[str, ...] = ()

    def describe(self) -> list[tuple[str, str, str]]:
        """Rows ``(key, value, source)`` with secrets masked, for `stcs check-config`."""
        rows = []
        for info in SETTINGS:
            value = getattr(self.settings, info.name)
            rows.append((info.key, display_value(info, value), self.sources[info.key]))
        return rows


def display_value(info: SettingInfo, value: Any) -> str:
    """A value as shown to an operator: secrets masked, URL passwords hidden."""
    if info.secret:
        return "********" if value else "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if info.key == "authServerEndpoint" and value:
        parts = urlsplit(value)
        if parts.password:
            return str(value).replace(f":{parts.password}@", ":********@", 1)
    return str(value) if value != "" else "(none)"


def _unknown_key_message(key: str, where: str) -> str:
    """The message for an unknown key, with the likeliest meant key: the closest by `difflib`
    with case ignored, so ``dbttl`` and ``dbtl`` suggest ``dbTTL`` (compared as typed, ``dbtl``
    is closer to ``dbPath``)."""
    by_lower = {k.lower(): k for k in BY_KEY}
    close = difflib.get_close_matches(key.lower(), list(by_lower), n=1)
    hint = f" (did you mean {by_lower[close[0]]!r}?)" if close else ""
    return f"unknown setting {key!r} in {where}{hint}"


def _parse_text(info: SettingInfo, raw: str, where: str) -> Any:
    """Parse a string value from the environment or the command line."""
    if info.type is bool:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{info.key} ({where}): expected true or false, got {raw!r}")
    if info.type is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"{info.key} ({where}): expected an integer, got {raw!r}") from None
    return raw


def _check_yaml_value(info: SettingInfo, value: Any, where: str) -> Any:
    """Type-check a value from YAML: ints must be ints (not bools), bools bools, strings str.

    A quoted number for an integer setting (``dbTTL: "180000"``) is read as the number, as the
    same text from the environment is: the Node.js server took such files.  Raises ConfigError.
    """
    if info.type is int and isinstance(value, str):
        return _parse_text(info, value, where)
    ok = (
        isinstance(value, bool)
        if info.type is bool
        else isinstance(value, int) and not isinstance(value, bool)
        if info.type is int
        else isinstance(value, str)
    )
    if not ok:
        expected = {bool: "true or false", int: "an integer", str: "a string"}[info.type]
        raise ConfigError(
            f"{info.key} ({where}): expected {expected}, got {type(value).__name__} {value!r}"
        )
    return value


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a YAML config file into a mapping.

    The file is read only if nobody but the invoking user or root could have written it
    (`stcs.localfiles.read_trusted_text`: a ``./config.yml`` planted in a shared directory
    would otherwise point ``stcs status`` and its admin key at another user's port).

    Raises ConfigError when the file is not trusted, cannot be read, is not valid YAML, or is
    not a mapping.
    """
    from stcs.localfiles import read_trusted_text

    text = read_trusted_text(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of settings")
    return data


def load_settings(
    cli: Mapping[str, str] | None = None,
    config_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Resolve settings from the command line, a YAML file, the environment and defaults.

    ``cli`` maps YAML keys to raw strings (from argparse).  ``config_path`` None means
    ``./config.yml`` if it exists; an explicit path must exist.  ``environ`` defaults to
    `os.environ`.

    Raises ConfigError naming the key for an unknown key, a wrong type or an invalid value.
    """
    import os

    cli = dict(cli or {})
    environ = os.environ if environ is None else environ
    notices: list[str] = []

    if config_path is None:
        default = Path(DEFAULT_CONFIG_FILE)
        yaml_values = read_config_file(default) if default.is_file() else {}
        yaml_where = f"{default.name} ({default.resolve()})" if default.is_file() else ""
    else:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        yaml_values = read_config_file(path)
        yaml_where = f"{path.name} ({path.resolve()})"

    for key in cli:
        if key not in BY_KEY:
            raise ConfigError(_unknown_key_message(key, "the command line"))
    for key in list(yaml_values):
        if key in IGNORED_KEYS:
            notices.append(f"{key} in {yaml_where} has no meaning for stcs and is ignored")
            del yaml_values[key]
        elif key not in BY_KEY:
            raise ConfigError(_unknown_key_message(str(key), yaml_where))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for info in SETTINGS:
        if info.key in cli:
            values[info.name] = _parse_text(info, cli[info.key], "command line")
            sources[info.key] = "command line"
        elif info.key in yaml_values and yaml_values[info.key] is not None:
            values[info.name] = _check_yaml_value(info, yaml_values[info.key], yaml_where)
            sources[info.key] = yaml_where
        elif info.env in environ and (environ[info.env] != "" or info.type is str):
            values[info.name] = _parse_text(info, environ[info.env], f"env {info.env}")
            sources[info.key] = f"env {info.env}"
        else:
            sources[info.key] = "default"

    settings = Settings(**values)
    _validate(settings, sources)
    if settings.enable_ssl and not settings.app_tls:
        notices.append(
            f"enableSSL: TLS is terminated by the {settings.web_server_type} front server, "
            "stcs itself serves plain HTTP"
        )
    return Resolved(settings=settings, sources=sources, notices=tuple(notices))


def validate(settings: Settings, sources: Mapping[str, str]) -> None:
    """Check ``settings`` as a whole (minimums, choices, URLs, TLS files named, ...); ``sources``
    maps YAML key -> where its value came from (for the message).  Raises ConfigError naming
    the key."""
    _validate(settings, sources)


def _validate(settings: Settings, sources: Mapping[str, str]) -> None:
    for info in SETTINGS:
        value = getattr(settings, info.name)
        where = sources[info.key]
        if info.minimum is not None and value < info.minimum:
            raise ConfigError(f"{info.key} ({where}): must be at least {info.minimum}, got {value}")
        if info.choices is not None and value not in info.choices:
            allowed = ", ".join(repr(c) for c in info.choices)
            raise ConfigError(f"{info.key} ({where}): must be one of {allowed}, got {value!r}")
    if settings.app_port > 65535:
        raise ConfigError(f"appPort ({sources['appPort']}): must be at most 65535")
    endpoint = settings.auth_server_endpoint
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"authServerEndpoint ({sources['authServerEndpoint']}): "
                "must be an http:// or https:// URL"
            )
    if settings.app_tls:
        for key, value in (
            ("sslCertFile", settings.ssl_cert_file),
            ("sslCertKeyFile", settings.ssl_cert_key_file),
        ):
            if not value:
                raise ConfigError(f"{key}: required when enableSSL is true")
    if not settings.db_path:
        raise ConfigError("dbPath: must not be empty")
    try:
        settings.trusted_networks  # noqa: B018  (parses the list)
    except ValueError as exc:
        raise ConfigError(f"trustedProxies ({sources['trustedProxies']}): {exc}") from None
    _validate_cluster(settings, sources)
    try:
        settings.child_ports  # noqa: B018  (parses the range)
    except ValueError as exc:
        raise ConfigError(f"childPortRange ({sources['childPortRange']}): {exc}") from None
    if settings.chroma_command:
        try:
            argv = settings.chroma_argv
        except ValueError as exc:
            raise ConfigError(f"chromaCommand ({sources['chromaCommand']}): {exc}") from None
        if not argv:
            raise ConfigError(f"chromaCommand ({sources['chromaCommand']}): names no program")


def _validate_cluster(settings: Settings, sources: Mapping[str, str]) -> None:
    """``clusterNodes`` parses (`stcs.ring.parse_nodes`) and names ``clusterSelf``; both or
    neither are set."""
    from stcs.ring import parse_nodes

    nodes, me = settings.cluster_nodes, settings.cluster_self
    if not nodes and not me:
        return
    if not nodes:
        raise ConfigError(f"clusterSelf ({sources['clusterSelf']}): set clusterNodes too")
    try:
        names = parse_nodes(nodes)
    except ValueError as exc:
        raise ConfigError(f"clusterNodes ({sources['clusterNodes']}): {exc}") from None
    if me.strip() not in names:
        raise ConfigError(
            f"clusterSelf ({sources['clusterSelf']}): must be one of clusterNodes ({nodes})"
        )
