"""``stcs render`` refuses a value its target file cannot carry as a plain value (docs/security.md,
"Local users"): each case below once injected a directive into the rendered nginx / Apache site
or systemd unit.  Each test renders with the hostile value and checks that stcs exits 2 naming
the key and prints nothing (before: exit 0 and the injected line in the output).  That the real
servers still accept the rendered defaults is `test_frontends.py`'s
``test_rendered_configuration_passes_the_servers_own_check`` and
``test_rendered_systemd_unit_passes_systemd_analyze_verify``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.harness import stcs_cli

TLS = ["--sslCertFile", "/etc/ssl/stcs.pem", "--sslCertKeyFile", "/etc/ssl/stcs.key"]

# (kind, args, the key stcs must name, a line the injection would add to the output)
INJECTIONS = [
    (
        "systemd",
        ["--appName", "stcs\nExecStartPre=/bin/sh -c 'id > /tmp/pwned'"],
        "appName",
        "ExecStartPre=/bin/sh -c 'id > /tmp/pwned'",
    ),
    (
        "nginx",
        ["--webServerHost", "example.com; return 302 http://evil.example/"],
        "webServerHost",
        "return 302 http://evil.example/;",
    ),
    (
        "apache",
        ["--webServerHost", "example.com\n    ProxyPass /x http://evil.example/"],
        "webServerHost",
        "    ProxyPass /x http://evil.example/",
    ),
    (
        "nginx",
        ["--listen", "80; location /x { return 200 'owned'; }"],
        "--listen",
        "location /x { return 200 'owned'; }",
    ),
    (
        "nginx-tls",
        [*TLS[:1], "/etc/ssl/a.pem; return 302 http://evil.example/", *TLS[2:]],
        "sslCertFile",
        "return 302 http://evil.example/;",
    ),
    (
        "apache-tls",
        [*TLS[:3], "/etc/ssl/a.key\n    ProxyPass /x http://evil.example/"],
        "sslCertKeyFile",
        "    ProxyPass /x http://evil.example/",
    ),
    (
        "nginx-cluster",
        ["--node", "127.0.0.1:1; server evil.example:80"],
        "--node",
        "server evil.example:80;",
    ),
    (
        "systemd",
        ["--stcs-bin", "/opt/stcs/bin/stcs\nExecStartPre=/bin/touch /tmp/pwned"],
        "--stcs-bin",
        "ExecStartPre=/bin/touch /tmp/pwned",
    ),
    (
        "systemd",
        ["--user", "stcs\nUser=root"],
        "--user",
        "User=root",
    ),
    (
        "systemd",
        ["--dbPath", "/srv/db\nExecStartPre=/bin/touch /tmp/pwned"],
        "dbPath",
        "ExecStartPre=/bin/touch /tmp/pwned",
    ),
    (
        "systemd",
        ["--config-path", "/etc/stcs/config.yml --adminAPIKey known"],
        "--config-path",
        "--adminAPIKey known",
    ),
    (
        "nftables",
        ["--childPortRange", "20000-20010", "--user", 'stcs" accept\n  }\n}\n#'],
        "--user",
        "accept\n  }\n}",
    ),
    (
        "nginx",
        ["--admin-from", "10.0.0.0/8; allow all"],
        "--admin-from",
        "allow all;",
    ),
    (
        "apache",
        ["--admin-from", "10.0.0.0/8' || true || '"],
        "--admin-from",
        "|| true ||",
    ),
    (
        "nginx-tls",
        [*TLS, "--admin-from", "10.0.0.1/8"],  # host bits set: meant 10.0.0.0/8 or 10.0.0.1?
        "--admin-from",
        "allow 10.0.0.",
    ),
    (
        "apache-tls",
        [*TLS, "--admin-from", "fe80::1%eth0"],  # a zone: neither server takes it there
        "--admin-from",
        "fe80::1",
    ),
]


@pytest.mark.parametrize(
    ("kind", "args", "key", "injected"),
    INJECTIONS,
    ids=[f"{k}-{key}" for k, _, key, _ in INJECTIONS],
)
def test_render_refuses_a_value_that_would_inject_configuration(
    kind: str, args: list[str], key: str, injected: str, tmp_path: Path
) -> None:
    out = tmp_path / "rendered"
    done = stcs_cli("render", kind, *args, "-o", str(out))
    rendered = out.read_text() if out.exists() else ""
    assert injected not in rendered, f"injected into {kind}:\n{rendered}"
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert f"{key}:" in done.stderr, done.stderr
    assert not out.exists()


@pytest.mark.parametrize("kind", ["nginx", "apache", "systemd"])
def test_render_accepts_ordinary_values(kind: str) -> None:
    done = stcs_cli(
        "render",
        kind,
        "--appName",
        "My Vector App-2.0",
        "--webServerHost",
        "chroma.example.com",
        "--listen",
        "[::1]:8080",
        "--dbPath",
        "/srv/stcs/db",
        "--user",
        "stcs",
    )
    assert done.returncode == 0, done.stderr
    assert "My Vector App-2.0" in done.stdout


def test_render_systemd_writes_the_service_and_its_socket_unit(tmp_path: Path) -> None:
    out = tmp_path / "my-stcs.service"
    done = stcs_cli("render", "systemd", "--appPort", "8123", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "ExecReload=/bin/kill -HUP $MAINPID" in out.read_text()
    socket_unit = (tmp_path / "my-stcs.socket").read_text()
    assert "ListenStream=127.0.0.1:8123\n" in socket_unit
    assert "Backlog=1024" in socket_unit
    done = stcs_cli("render", "systemd-socket", "--appPort", "8124", "--bindToLocalhost", "false")
    assert done.returncode == 0 and "ListenStream=0.0.0.0:8124\n" in done.stdout


def test_every_placeholder_of_the_socket_unit_is_checked() -> None:
    from stcs.config import Settings
    from stcs.deploy import KINDS, TEMPLATES, RenderOptions, _checks

    text = (TEMPLATES / KINDS["systemd-socket"]).read_text()
    used = set(re.findall(r"\{\{([a-z_]+)\}\}", text))
    checked = {p for c in _checks(Settings(), RenderOptions()) for p in c.placeholders}
    assert used <= checked, used - checked


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("nginx", ["        allow 10.0.0.0/8;", "        allow 192.0.2.7/32;", "allow ::1/128;"]),
        ("apache", ["<If \"! -R '10.0.0.0/8' && ! -R '192.0.2.7/32' && ! -R '::1/128'\">"]),
    ],
)
def test_admin_from_networks_are_written_in_their_canonical_form(
    kind: str, expected: list[str]
) -> None:
    """``--admin-from`` takes a network (netmask or prefix) or one address; the site gets one
    spelling both servers read.  Without it no network is allowed (`test_frontend_errors`)."""
    args = ["--admin-from", "10.0.0.0/255.0.0.0", "--admin-from", "192.0.2.7"]
    done = stcs_cli("render", kind, *args, "--admin-from", "::1")
    assert done.returncode == 0, done.stderr
    for line in expected:
        assert line in done.stdout, done.stdout
    plain = stcs_cli("render", kind).stdout
    if kind == "nginx":
        assert "allow" not in plain and "deny all;" in plain
    else:
        assert '<If "true">' in plain
