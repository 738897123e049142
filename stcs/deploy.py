"""Deployment files rendered from the resolved settings: nginx and Apache sites (HTTP, TLS),
the nginx cluster router, the systemd unit and the nftables rule that keeps the children's ports
(``childPortRange``) to stcs's user.  Used by ``stcs render`` and ``scripts/setup.sh``.

Templates live in ``stcs/templates/`` (``nginx/`` and ``apache/`` at the top of the repository
point there) and use ``{{name}}`` placeholders: nginx and Apache both use ``$`` themselves.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from stcs.config import Settings
from stcs.errors import ConfigError

TEMPLATES = Path(__file__).parent / "templates"

KINDS = {
    "nginx": "nginx/stcs.conf",
    "nginx-tls": "nginx/stcs-tls.conf",
    "nginx-cluster": "nginx/stcs-cluster.conf",
    "apache": "apache/stcs.conf",
    "apache-tls": "apache/stcs-tls.conf",
    "systemd": "systemd/stcs.service",
    "systemd-socket": "systemd/stcs.socket",
    "nftables": "nftables/stcs.nft",
}

# Drain (stcs.cli.SHUTDOWN_GRACE_S) plus stopping children, plus margin (s).
_STOP_MARGIN_S = 20


class _Template(string.Template):
    delimiter = "{{"
    # A str, compiled by string.Template.__init_subclass__ (typeshed says Pattern).
    pattern = cast(
        "re.Pattern[str]",
        r"""
        \{\{(?:
          (?P<escaped>\{\{) |
          (?P<named>[a-z_]+)\}\} |
          (?P<braced>[a-z_]+)\}\} |
          (?P<invalid>)
        )
        """,
    )


@dataclass(frozen=True)
class RenderOptions:
    """What the settings do not say.  ``listen`` / ``tls_listen``: nginx ``listen`` or Apache
    ``VirtualHost`` address (``80``, ``127.0.0.1:8080``); ``nodes``: cluster ``host:port``s;
    ``admin_from``: the networks (CIDR, or one address) the nginx/Apache site routes stcs's
    operator endpoints for (empty: none, answered 404 by the front server); the rest describes
    the installation for the systemd unit."""

    listen: str = "80"
    tls_listen: str = "443"
    nodes: tuple[str, ...] = ()
    admin_from: tuple[str, ...] = ()
    user: str = "stcs"
    stcs_bin: str = "/opt/stcs/venv/bin/stcs"
    config_path: str = "/etc/stcs/config.yml"
    working_dir: str = "/var/lib/stcs"
    source_dir: str = "/opt/stcs/src"


def _port_of(listen: str) -> str:
    return listen.rsplit(":", 1)[-1] if ":" in listen else listen


def _apache_address(listen: str) -> str:
    return listen if ":" in listen else f"*:{listen}"


def render(kind: str, settings: Settings, options: RenderOptions | None = None) -> str:
    """Render deployment file ``kind`` (a key of `KINDS`) for ``settings``.

    Raises ConfigError when what the kind needs is missing (TLS files, cluster nodes), or when
    a value it substitutes is not what its target allows there (`check_values`).
    """
    opts = options or RenderOptions()
    if kind not in KINDS:
        raise ConfigError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
    if kind.endswith("-tls") and not (settings.ssl_cert_file and settings.ssl_cert_key_file):
        raise ConfigError(f"{kind}: sslCertFile and sslCertKeyFile must be set")
    if kind == "nginx-cluster" and not opts.nodes:
        raise ConfigError("nginx-cluster: name the nodes (--node HOST:PORT, one per node)")
    ports = settings.child_ports
    if kind == "nftables" and ports is None:
        raise ConfigError("nftables: set childPortRange (e.g. 20000-29999) first")
    apache = kind.startswith("apache")
    tls_port = _port_of(opts.tls_listen)
    values = {
        "app_name": settings.app_name,
        "upstream_name": re.sub(r"[^A-Za-z0-9_]", "_", settings.app_name) or "stcs",
        "app_host": "127.0.0.1",  # stcs listens on loopback (or all interfaces): reach it locally
        "app_port": str(settings.app_port),
        "listen_address": f"{settings.listen_host}:{settings.app_port}",
        "server_name": settings.web_server_host or ("localhost" if apache else "_"),
        "listen": _apache_address(opts.listen) if apache else opts.listen,
        "tls_listen": _apache_address(opts.tls_listen) if apache else opts.tls_listen,
        "tls_port_suffix": "" if tls_port == "443" else f":{tls_port}",
        "max_body_size": str(settings.max_body_size),
        "ssl_cert_file": settings.ssl_cert_file,
        "ssl_cert_key_file": settings.ssl_cert_key_file,
        "auth_servers": "\n".join(f"    server {n};" for n in opts.nodes),
        "data_servers": "\n".join(f"    server {n} max_fails=0;" for n in opts.nodes),
        "admin_allow": "".join(f"        allow {n};\n" for n in _networks(opts.admin_from)),
        "admin_hidden": " && ".join(f"! -R '{n}'" for n in _networks(opts.admin_from)) or "true",
        "user": opts.user,
        "stcs_bin": opts.stcs_bin,
        "config_path": opts.config_path,
        "working_dir": opts.working_dir,
        "source_dir": opts.source_dir,
        "stop_timeout_s": str(_STOP_MARGIN_S + settings.db_stop_timeout // 1000),
        "read_write_paths": " ".join(read_write_paths(settings, opts)),
        "table": re.sub(r"[^A-Za-z0-9_]", "_", settings.app_name) or "stcs",
        "port_first": str(ports[0]) if ports else "",
        "port_last": str(ports[1]) if ports else "",
        "uid": _nft_uid(opts.user),
    }
    template = (TEMPLATES / KINDS[kind]).read_text()
    if kind in ("nginx", "nginx-tls", "apache", "apache-tls"):
        block = "apache/proxy-block.conf" if apache else "nginx/proxy-block.conf"
        block_text = (TEMPLATES / block).read_text()
        check_values(block_text, settings, opts)
        values["proxy_block"] = _Template(block_text).substitute(values)
    check_values(template, settings, opts)
    text = _Template(template).substitute(values)
    if kind == "nginx-cluster":
        text = render_record(settings, opts) + text
    return text


# -- what a cluster router was rendered with (`stcs cluster rebalance` renders it again) --------

RECORD_PREFIX = "# stcs-render: "


def render_record(settings: Settings, options: RenderOptions) -> str:
    """The comment line recording what ``nginx-cluster`` was rendered with: the options and the
    settings the template reads (``appName``, ``maxBodySize``, ``webServerHost``), as JSON, so
    ``stcs cluster rebalance`` renders the same router with another node list."""
    doc = {
        "kind": "nginx-cluster",
        "listen": options.listen,
        "nodes": list(options.nodes),
        "adminFrom": list(options.admin_from),
        "appName": settings.app_name,
        "maxBodySize": settings.max_body_size,
        "webServerHost": settings.web_server_host,
    }
    return RECORD_PREFIX + json.dumps(doc, separators=(",", ":")) + "\n"


def read_record(text: str, settings: Settings) -> tuple[Settings, RenderOptions]:
    """``(settings, options)`` to render the router again, from the `render_record` line of
    the file ``text`` (``settings``: the rest of the settings).  Raises ConfigError when the
    file has no such line or it is unreadable."""
    for line in text.splitlines():
        if line.startswith(RECORD_PREFIX):
            try:
                doc = json.loads(line[len(RECORD_PREFIX) :])
                recorded = dataclasses.replace(
                    settings,
                    app_name=str(doc["appName"]),
                    max_body_size=int(doc["maxBodySize"]),
                    web_server_host=str(doc["webServerHost"]),
                )
                options = RenderOptions(
                    listen=str(doc["listen"]),
                    nodes=tuple(str(n) for n in doc["nodes"]),
                    admin_from=tuple(str(n) for n in doc["adminFrom"]),
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"the {RECORD_PREFIX.strip()} line is unreadable: {exc}"
                ) from None
            return recorded, options
    raise ConfigError(
        f"no '{RECORD_PREFIX.strip()}' line: render this file with this version's "
        "`stcs render nginx-cluster` first (it records its options there)"
    )


def _networks(values: tuple[str, ...]) -> list[str]:
    """``--admin-from`` values as networks in their canonical form (``10.0.0.0/8``,
    ``::1/128``): one spelling both nginx ``allow`` and Apache ``-R`` take.  Values that are
    not networks are left for `check_values` to refuse."""
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_network(value)))
        except ValueError:
            out.append(value)
    return out


def _nft_uid(user: str) -> str:
    """``meta skuid`` operand: a numeric uid as it is, a user name quoted (nft resolves it)."""
    return user if user.isdigit() else f'"{user}"'


def read_write_paths(settings: Settings, options: RenderOptions) -> list[str]:
    """Directories the service writes: ``dbPath`` and the directory of ``logFile``, both
    resolved against the unit's working directory."""
    base = Path(options.working_dir)
    paths = [base / Path(settings.db_path).expanduser()]
    if settings.log_file:
        paths.append((base / Path(settings.log_file).expanduser()).parent)
    return [str(p) for p in paths]


# -- what each substituted value may be ----------------------------------------------------------
#
# The templates are nginx, Apache, systemd and nft files: a newline, ``;``, ``{``, a quote or a
# space in a value would end the directive it sits in and start another (a newline in appName
# added an ``ExecStartPre=`` line to the unit; a ``;`` in webServerHost an nginx directive).  No
# escaping is attempted (each format quotes differently, and systemd expands ``%`` even inside
# quotes): every value is checked against what its place allows, and anything else is refused
# naming its key (`render` → exit 2).

_HOST_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
# RFC 1123 host name, optionally a leading "*." (an nginx/Apache wildcard server name).
_HOST_RE = re.compile(rf"^(\*\.)?{_HOST_LABEL}(\.{_HOST_LABEL})*\.?$")
# What appName may hold: it lands in comments and in systemd's Description= (where "%" is a
# specifier and "\\" an escape), so letters, digits, space, ".", "_", "-" only.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,63}$")
# An absolute path every target takes as one word: no space, quote, ";", "%", "$", "\\", "#".
_PATH_RE = re.compile(r"^/[A-Za-z0-9._/@+=,:-]*$")
# A user name as useradd(8) accepts it (Debian's NAME_REGEX, without the trailing "$"), or a uid.
_USER_RE = re.compile(r"^([a-z_][a-z0-9_-]{0,31}|[0-9]{1,10})$")


def _host(value: str) -> bool:
    """A host name (`_HOST_RE`), an IPv4 address, or an IPv6 address in brackets."""
    if value.startswith("[") and value.endswith("]"):
        try:
            ipaddress.IPv6Address(value[1:-1])
        except ValueError:
            return False
        return True
    return bool(_HOST_RE.match(value)) and len(value) <= 253


def _port(value: str) -> bool:
    return value.isdigit() and len(value) <= 5 and 1 <= int(value) <= 65535


def _host_port(value: str) -> bool:
    """``HOST:PORT`` (HOST as `_host`)."""
    host, sep, port = value.rpartition(":")
    return bool(sep) and _host(host) and _port(port)


def _listen(value: str) -> bool:
    """``PORT`` or ``HOST:PORT``; HOST may be ``*`` (all addresses, as both servers write it)."""
    if _port(value):
        return True
    host, _, port = value.rpartition(":")
    return (host == "*" and _port(port)) or _host_port(value)


def _network(value: str) -> bool:
    """An IPv4 or IPv6 network in CIDR form without host bits (``10.0.0.0/8``), or one
    address (``192.0.2.7``, ``::1``), as `ipaddress.ip_network` reads it; no IPv6 zone
    (``%eth0``), which neither server takes there."""
    if not re.fullmatch(r"[0-9A-Fa-f.:/]+", value):
        return False
    try:
        ipaddress.ip_network(value)
    except ValueError:
        return False
    return True


def _path(value: str) -> bool:
    return bool(_PATH_RE.match(value)) and "/../" not in f"{value}/"


_PATH_RULE = "an absolute path of letters, digits and ._/@+=,:-"
_USER_RULE = "a user name (useradd's rules) or a numeric uid"


@dataclass(frozen=True)
class _Check:
    """One substituted value: the ``key`` (setting or option) it comes from, the rule it must
    meet (``ok``, said in words as ``allowed``) and the placeholders it fills."""

    key: str
    value: str
    ok: Callable[[str], bool]
    allowed: str
    placeholders: tuple[str, ...]


def _checks(settings: Settings, opts: RenderOptions) -> list[_Check]:
    paths = read_write_paths(settings, opts)
    checks = [
        _Check(
            "appName",
            settings.app_name,
            lambda v: bool(_NAME_RE.match(v)),
            "1-64 letters, digits, spaces, '.', '_' or '-'",
            ("app_name",),
        ),
        _Check(
            "appPort",
            f"{settings.listen_host}:{settings.app_port}",
            _host_port,
            "HOST:PORT",
            ("listen_address",),
        ),
        _Check("--listen", opts.listen, _listen, "PORT or HOST:PORT", ("listen",)),
        _Check("--tls-listen", opts.tls_listen, _listen, "PORT or HOST:PORT", ("tls_listen",)),
        _Check("sslCertFile", settings.ssl_cert_file, _path, _PATH_RULE, ("ssl_cert_file",)),
        _Check(
            "sslCertKeyFile",
            settings.ssl_cert_key_file,
            _path,
            _PATH_RULE,
            ("ssl_cert_key_file",),
        ),
        _Check("--user", opts.user, lambda v: bool(_USER_RE.match(v)), _USER_RULE, ("user", "uid")),
        _Check("--stcs-bin", opts.stcs_bin, _path, _PATH_RULE, ("stcs_bin",)),
        _Check("--config-path", opts.config_path, _path, _PATH_RULE, ("config_path",)),
        _Check("--working-dir", opts.working_dir, _path, _PATH_RULE, ("working_dir",)),
        _Check("--source-dir", opts.source_dir, _path, _PATH_RULE, ("source_dir",)),
        _Check("dbPath", paths[0], _path, _PATH_RULE, ("read_write_paths",)),
    ]
    if settings.web_server_host:
        checks.append(
            _Check(
                "webServerHost",
                settings.web_server_host,
                _host,
                "one host name (RFC 1123, optionally '*.'), IPv4 address or [IPv6] address",
                ("server_name",),
            )
        )
    if len(paths) > 1:
        checks.append(_Check("logFile", paths[1], _path, _PATH_RULE, ("read_write_paths",)))
    checks += [
        _Check("--node", node, _host_port, "HOST:PORT", ("auth_servers", "data_servers"))
        for node in opts.nodes
    ]
    checks += [
        _Check(
            "--admin-from",
            network,
            _network,
            "an IPv4 or IPv6 network (CIDR, no host bits) or one address",
            ("admin_allow", "admin_hidden"),
        )
        for network in opts.admin_from
    ]
    return checks


def check_values(template: str, settings: Settings, opts: RenderOptions) -> None:
    """Check every value ``template`` substitutes against what its place allows.

    Raises ConfigError naming the key (setting or ``render`` option) of the first that fails.
    """
    used = set(re.findall(r"\{\{([a-z_]+)\}\}", template))
    for check in _checks(settings, opts):
        if used.intersection(check.placeholders) and not check.ok(check.value):
            raise ConfigError(
                f"{check.key}: {check.value!r} cannot go into this file: expected {check.allowed}"
            )
