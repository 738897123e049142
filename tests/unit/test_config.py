"""Configuration (stcs.config, stcs.cli's parser), in-process: precedence, types, errors that
name the key, docs that match the code.  The subcommands run as processes are in
tests/e2e/test_config.py."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from stcs.cli import build_parser, main
from stcs.config import BY_KEY, IGNORED_KEYS, SETTINGS, load_settings
from stcs.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


NODE_SAMPLE = """
webServerType: "apache"
webServerHost: "single-tenant-chroma-server.example.com"
appName: "single-tenant-chroma-server"
appPort: 8070
authServerEndpoint: "https://localhost:3000/validate-token"
authServerAPIKey: ""
adminAPIKey: ""
dbPath: "./chromadb"
dbTTL: 180000
dbMaxInstances: 50
queueTimeout: 300000
dbMaxRetries: 2
logFile: ""
logLevel: "info"
compileFromSource: true
bindToLocalhost: true
enableSSL: false
sslCertFile: "/etc/ssl/certs/chroma-proxy.example.com.crt"
sslCertKeyFile: "/etc/ssl/private/chroma-proxy.example.com.key"
useDocker: false
dockerImageName: "chroma-server-proxy-image"
dockerContainerName: "chroma-server-proxy-container"
nodeVersion: "20.11.0"
pythonVersion: "3.10"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(text)
    return path


def test_defaults_match_the_issue() -> None:
    s = load_settings(environ={}, config_path=None).settings
    assert (s.app_port, s.bind_to_localhost, s.db_path, s.db_ttl) == (
        8000,
        True,
        "./chromadb",
        180000,
    )
    assert (s.db_max_instances, s.queue_timeout, s.db_max_retries) == (50, 30000, 2)
    assert (s.db_start_timeout, s.db_stop_timeout, s.db_min_free_memory_mb) == (20000, 10000, 500)
    assert (s.auth_cache_ttl, s.auth_timeout, s.max_body_size) == (60000, 5000, 100 * 2**20)
    assert s.chroma_command == "" and s.log_level == "info" and s.listen_host == "127.0.0.1"


def test_node_sample_config_loads_as_is(tmp_path: Path) -> None:
    resolved = load_settings(config_path=write(tmp_path, NODE_SAMPLE), environ={})
    s = resolved.settings
    assert s.app_port == 8070 and s.queue_timeout == 300000
    assert s.auth_server_endpoint == "https://localhost:3000/validate-token"
    assert s.web_server_type == "apache" and s.docker_image_name == "chroma-server-proxy-image"
    ignored = [n for n in resolved.notices if "ignored" in n]
    assert len(ignored) == len(IGNORED_KEYS)
    assert all(any(k in n for n in ignored) for k in IGNORED_KEYS)


def test_precedence_cli_over_yaml_over_env_over_default(tmp_path: Path) -> None:
    path = write(tmp_path, "appPort: 8100\ndbTTL: 2000\n")
    env = {"APP_PORT": "8200", "DB_TTL": "3000", "DB_MAX_INSTANCES": "7"}
    resolved = load_settings(cli={"appPort": "8300"}, config_path=path, environ=env)
    s = resolved.settings
    assert (s.app_port, s.db_ttl, s.db_max_instances, s.db_max_retries) == (8300, 2000, 7, 2)
    assert resolved.sources["appPort"] == "command line"
    assert resolved.sources["dbTTL"].startswith("config.yml")
    assert resolved.sources["dbMaxInstances"] == "env DB_MAX_INSTANCES"
    assert resolved.sources["dbMaxRetries"] == "default"


def test_default_config_file_is_read_from_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, "dbTTL: 4242\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings(environ={}).settings.db_ttl == 4242


def test_env_booleans_and_ints_are_parsed() -> None:
    s = load_settings(
        environ={
            "BIND_LOCALHOST": "false",
            "ENABLE_SSL": "0",
            "SSL_CERT_FILE": "",
            "MAX_BODY_SIZE": "1024",
        },
        config_path=None,
    ).settings
    assert s.bind_to_localhost is False and s.listen_host == "0.0.0.0"
    assert s.max_body_size == 1024


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("dbTtl: 5\n", "'dbTtl'"),  # unknown key, with a suggestion
        ("appPort: 'eight'\n", "appPort"),  # wrong type
        ("appPort: '80.5'\n", "appPort"),
        ("bindToLocalhost: 1\n", "bindToLocalhost"),
        ("dbMaxInstances: true\n", "dbMaxInstances"),
        ("dbMaxInstances: 0\n", "dbMaxInstances"),
        ("logLevel: loud\n", "logLevel"),
        ("webServerType: caddy\n", "webServerType"),
        ("authServerEndpoint: ftp://x\n", "authServerEndpoint"),
        ("appPort: 70000\n", "appPort"),
        ('chromaCommand: "\'unclosed"\n', "chromaCommand"),
        ("trustedProxies: '10.0.0.0/8, nonsense'\n", "trustedProxies"),
        ("- a\n- b\n", "mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_yaml_value_is_an_error_naming_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_settings(config_path=write(tmp_path, text), environ={})


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'dbTTL'"):
        load_settings(config_path=write(tmp_path, "dbTtl: 5\n"), environ={})


@pytest.mark.parametrize("typo", ["dbtl", "dbttl", "DBTTL", "dbTtl"])
def test_unknown_key_suggestion_ignores_case(tmp_path: Path, typo: str) -> None:
    with pytest.raises(ConfigError, match="did you mean 'dbTTL'"):
        load_settings(config_path=write(tmp_path, f"{typo}: 5\n"), environ={})


def test_quoted_numbers_load_as_numbers_as_from_the_environment(tmp_path: Path) -> None:
    # The Node.js server read `dbTTL: "180000"`; the environment gives the same text as a string.
    text = 'appPort: "8070"\ndbTTL: "180000"\ndbMaxInstances: " 7 "\nqueueTimeout: "0"\n'
    s = load_settings(config_path=write(tmp_path, text), environ={}).settings
    assert (s.app_port, s.db_ttl, s.db_max_instances, s.queue_timeout) == (8070, 180000, 7, 0)
    with pytest.raises(ConfigError, match=r"dbMaxInstances .*at least 1"):
        load_settings(config_path=write(tmp_path, 'dbMaxInstances: "0"\n'), environ={})


def test_errors_name_the_config_file_that_was_given(tmp_path: Path) -> None:
    path = tmp_path / "stcs-prod.yaml"
    path.write_text("dbTTL: soon\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_path=path, environ={})
    assert f"stcs-prod.yaml ({path})" in str(caught.value)
    assert "config.yml" not in str(caught.value)
    path.write_text("appName: x\n")
    assert load_settings(config_path=path, environ={}).sources["appName"] == (
        f"stcs-prod.yaml ({path})"
    )


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="DB_TTL"):
        load_settings(environ={"DB_TTL": "soon"}, config_path=None)


def test_enable_ssl_requires_cert_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sslCertFile"):
        load_settings(config_path=write(tmp_path, "enableSSL: true\n"), environ={})
    # A front web server terminates TLS: stcs itself needs no certificate.
    r = load_settings(
        config_path=write(tmp_path, "enableSSL: true\nwebServerType: nginx\n"), environ={}
    )
    assert not r.settings.app_tls and any("nginx" in n for n in r.notices)


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config_path=tmp_path / "nope.yml", environ={})


def test_sample_config_covers_exactly_the_settings_and_loads() -> None:
    sample = ROOT / "config.sample.yml"
    keys = set(yaml.safe_load(sample.read_text()))
    assert keys == set(BY_KEY)
    load_settings(config_path=sample, environ={})


def test_readme_table_covers_exactly_the_settings() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \|", readme, flags=re.MULTILINE)
    assert {k for k, _ in rows} == set(BY_KEY)
    assert {k: e for k, e in rows} == {s.key: s.env for s in SETTINGS}


def _subcommands() -> list[str]:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(sub.choices)


def test_the_subcommands_are_those_the_readme_names() -> None:
    assert _subcommands() == [
        "backup", "check-config", "cluster", "render", "restore", "serve", "status", "user-ref",
        "users"
    ]  # fmt: skip
    readme = (ROOT / "README.md").read_text()
    for command in _subcommands():
        assert f"stcs {command}" in readme, command


@pytest.mark.parametrize(
    "command", [[], *([c] for c in _subcommands())], ids=lambda c: " ".join(["stcs", *c])
)
def test_every_help_prints_usage_and_exits_0(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: stcs")
    # the settings' help, eventLoop's has a literal %; `cluster`'s verbs carry the settings
    if command and command not in (["user-ref"], ["cluster"]):
        assert "--eventLoop" in out and "~5 % more" in " ".join(out.split())


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    from stcs import __version__

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"stcs {__version__}"
