"""Deployment files rendered from the resolved settings: nginx and Apache sites (HTTP, TLS),
the nginx cluster router, the systemd unit and the nftables rule that keeps the children's ports
(``childPortRange``) to stcs's user.  Used by ``stcs render`` and ``scripts/setup.sh``.

Templates live in ``stcs/templates/`` (``nginx/`` and ``apache/`` at the top of the repository
point there) and use ``{{name}}`` placeholders: nginx and Apache both use ``$`` themselves.
"""

from __future__ import annotations

import re
import string
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
    the rest describes the installation for the systemd unit."""

    listen: str = "80"
    tls_listen: str = "443"
    nodes: tuple[str, ...] = ()
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

    Raises ConfigError when what the kind needs is missing (TLS files, cluster nodes).
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
        "server_name": settings.web_server_host or ("localhost" if apache else "_"),
        "listen": _apache_address(opts.listen) if apache else opts.listen,
        "tls_listen": _apache_address(opts.tls_listen) if apache else opts.tls_listen,
        "tls_port_suffix": "" if tls_port == "443" else f":{tls_port}",
        "max_body_size": str(settings.max_body_size),
        "ssl_cert_file": settings.ssl_cert_file,
        "ssl_cert_key_file": settings.ssl_cert_key_file,
        "auth_servers": "\n".join(f"    server {n};" for n in opts.nodes),
        "data_servers": "\n".join(f"    server {n} max_fails=0;" for n in opts.nodes),
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
    if kind in ("nginx", "nginx-tls", "apache", "apache-tls"):
        block = "apache/proxy-block.conf" if apache else "nginx/proxy-block.conf"
        values["proxy_block"] = _Template((TEMPLATES / block).read_text()).substitute(values)
    return _Template((TEMPLATES / KINDS[kind]).read_text()).substitute(values)


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
