"""The Grafana dashboard (grafana/stcs-dashboard.json) and the alert rules
(prometheus/stcs-alerts.yml) against a real Prometheus (Debian's ``prometheus`` package, run here
with its own configuration and data directory) scraping real stcs servers driven with real
traffic: every panel's query returns data, and shows the traffic that should move it."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
import yaml

from tests.harness import (
    ADMIN,
    COLLECTIONS,
    ROOT,
    AuthServer,
    StcsServer,
    client_for,
    free_port,
    new_token,
    readme_block,
)

DASHBOARD = ROOT / "grafana" / "stcs-dashboard.json"
RULES = ROOT / "prometheus" / "stcs-alerts.yml"
RULES_TEST = ROOT / "prometheus" / "stcs-alerts.test.yml"
SCRAPE_S = 1  # the test's scrape and rule evaluation interval
# Dashboard variables as the test sets them: every instance, windows that cover the whole test.
VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "5m",
    "$job": "stcs",
    "$instance": ".*",
}
HEARTBEAT = "/api/v2/heartbeat"
CHILD_PORTS = 4  # server A's childPortRange: the test binds its first port before A starts


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    if path is None:
        pytest.skip(
            f"{name} is not installed (Debian package prometheus; scripts/test installs it "
            "when run as root)"
        )
    return path


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but rows (the panels of collapsed rows included)."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def substitute(expr: str) -> str:
    for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr.replace("$labels", ""), f"unsubstituted variable in {expr}"
    return expr


# -- the files on their own ----------------------------------------------------------------


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    promtool = _tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout
    tested = subprocess.run(
        [promtool, "test", "rules", RULES_TEST.name],
        cwd=RULES_TEST.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every rule has a unit test.
    rules = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    cases = yaml.safe_load(RULES_TEST.read_text())["tests"]
    tested_alerts = {
        t["alertname"] for case in cases for t in case["alert_rule_test"] if t["exp_alerts"]
    }
    assert tested_alerts == rules


def test_the_dashboard_imports_as_is() -> None:
    """What Grafana's import needs: no instance-specific ids, a datasource variable every panel
    and variable uses, unique panel ids, panels that do not overlap; every query selects by the
    dashboard's job and instance."""
    dashboard = load_dashboard()
    assert dashboard["id"] is None and dashboard["uid"] == "stcs"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["job"]["datasource"] == variables["instance"]["datasource"] == ref
    ids = [p["id"] for p in dashboard["panels"]] + [
        p["id"] for row in dashboard["panels"] for p in row.get("panels", [])
    ]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not mine & cells, f"{panel['title']!r} overlaps another panel"
        cells |= mine
    for panel in panels(dashboard):
        assert panel["datasource"] == ref and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == ref
            selectors = re.findall(r"\{([^}]*)\}", target["expr"])
            assert selectors, (panel["title"], target["expr"])
            for selector in selectors:
                assert 'job="$job"' in selector and 'instance=~"$instance"' in selector, (
                    panel["title"],
                    target["expr"],
                )


def test_the_readme_points_at_the_files_instead_of_inlining_them() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "grafana/stcs-dashboard.json" in readme and "prometheus/stcs-alerts.yml" in readme
    assert "alert: StcsDown" not in readme  # the rules live in one place


# -- a real Prometheus scraping real stcs servers --------------------------------------------


@dataclass
class Prometheus:
    """A ``prometheus`` process with its own configuration and data directory."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: Any) -> Any:
        resp = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=start, end=end, step=SCRAPE_S)
        return list(data["result"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_prometheus(tmp_path: Path, targets: list[StcsServer]) -> Prometheus:
    """Prometheus scraping ``targets`` every second as the README's scrape configuration does
    (the admin key as bearer credentials from a file), with the repository's alert rules."""
    binary = _tool("prometheus")
    key = tmp_path / "stcs-admin-key"
    key.write_text(ADMIN)
    key.chmod(0o600)
    config = yaml.safe_load(readme_block("<!-- prometheus.yml", "yaml"))
    [job] = config["scrape_configs"]
    job["authorization"]["credentials_file"] = str(key)
    job["static_configs"] = [{"targets": [f"127.0.0.1:{s.port}" for s in targets]}]
    config["global"] = {
        "scrape_interval": f"{SCRAPE_S}s",
        "scrape_timeout": f"{SCRAPE_S}s",
        "evaluation_interval": f"{SCRAPE_S}s",
    }
    config["rule_files"] = [str(RULES)]
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    out = log_path.open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    out.close()
    prometheus = Prometheus(proc=proc, port=port, log_path=log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{log_path.read_text()}"
            try:
                if requests.get(f"{prometheus.url}/-/ready", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{log_path.read_text()}"
            time.sleep(0.1)
        # Both targets scraped at least once, with the admin key (up is 0 on a 403).
        while len([r for r in prometheus.query('up{job="stcs"} == 1')]) < len(targets):
            assert time.monotonic() < deadline, prometheus.api("targets")
            time.sleep(0.2)
    except BaseException:
        prometheus.stop()
        raise
    return prometheus


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[list[StcsServer]], Prometheus]]:
    started: list[Prometheus] = []

    def factory(targets: list[StcsServer]) -> Prometheus:
        started.append(start_prometheus(tmp_path, targets))
        return started[-1]

    yield factory
    for prometheus in started:
        prometheus.stop()


def _scraped_after(prometheus: Prometheus, moment: float, targets: int) -> None:
    """Wait until every target was scraped after ``moment`` (wall-clock seconds)."""
    deadline = time.monotonic() + 15
    while True:
        done = prometheus.query(f'timestamp(stcs_up{{job="stcs"}}) > {moment:.3f}')
        if len(done) >= targets:
            return
        assert time.monotonic() < deadline, "stcs not scraped after the traffic"
        time.sleep(0.2)


def _finite(value: str) -> float | None:
    number = float(value)
    return None if math.isnan(number) or math.isinf(number) else number


@pytest.fixture
def squatted_range() -> Iterator[tuple[int, int]]:
    """``CHILD_PORTS`` consecutive ports free but the first, which the test binds (not
    listening, as a local user squatting the range would) until the end of the test."""
    for _ in range(200):
        # Below the ephemeral range (free_port's) and apart from the ranges of
        # tests/e2e/test_local_ports.py (24000-32000) and tests/deploy/test_firewall.py (23100-).
        first = random.randrange(16000, 20000)
        socks = [socket.socket() for _ in range(CHILD_PORTS)]
        try:
            for port, sock in zip(range(first, first + CHILD_PORTS), socks, strict=True):
                sock.bind(("127.0.0.1", port))
        except OSError:
            for sock in socks:
                sock.close()
            continue
        for sock in socks[1:]:
            sock.close()
        try:
            yield first, first + CHILD_PORTS - 1
        finally:
            socks[0].close()
        return
    raise AssertionError("no free port range")


# Series that must move in a panel (title -> label -> values), beyond "some series moves".
EXPECTED_SERIES = {
    "Requests by status class": ("status_class", {"2xx", "4xx", "5xx"}),
    "Instance starts": ("result", {"ok", "failed"}),
    "Instance stops by reason": ("reason", {"evicted"}),
    "Quota refusals by limit": ("limit", {"collections"}),
    "Token lookups by result": ("result", {"ok", "rejected", "error", "cache_hit"}),
}
# Panels one series per value of a label: every value stcs exports (created at 0 from the
# start) is a series of the panel, the ones this traffic does not move included.
EVERY_VALUE = {
    "Instance starts": ("stcs_instance_starts_total", "result"),
    "Instance stops by reason": ("stcs_instance_stops_total", "reason"),
    "Quota refusals by limit": ("stcs_quota_rejections_total", "limit"),
    "Token lookups by result": ("stcs_auth_lookups_total", "result"),
}


def test_every_panel_shows_data_from_a_real_prometheus(
    tmp_path: Path,
    stcs: Callable[..., StcsServer],
    auth_server: AuthServer,
    prometheus_factory: Callable[[list[StcsServer]], Prometheus],
    squatted_range: tuple[int, int],
) -> None:
    began = time.monotonic()
    # Server A: an auth server, one instance slot (so starts queue and evict), a 2 s dbTTL,
    # one collection per user, a user whose database is corrupt (its starts fail), and a
    # childPortRange of 4 ports whose first the test holds (held, lent and foreign ports).
    db = tmp_path / "db-a"
    (db / "broken").mkdir(mode=0o700, parents=True)
    db.chmod(0o700)
    (db / "broken" / "chroma.sqlite3").write_bytes(b"not a database " * 1000)
    users = {"t-alice": "alice", "t-bob": "bob", "t-broken": "broken"}
    auth_server.answers.update({t: (200, {"userId": u}) for t, u in users.items()})
    auth_server.answers["t-error"] = (500, "auth server trouble")
    a = stcs(
        "--adminAPIKey", ADMIN, "--authServerEndpoint", auth_server.url,
        "--dbMaxInstances", "1", "--ttl", "2000", "--queueTimeout", "20000",
        "--dbMaxRetries", "0", "--userMaxCollections", "1", "--userMaxDiskMB", "100",
        "--childPortRange", "{}-{}".format(*squatted_range), db=db, name="a",
    )  # fmt: skip
    # Server B: a memory floor above the machine's memory, so its starts wait and time out,
    # and one new user per minute per address (UUID mode: every new token is a new user).
    total_mb = psutil.virtual_memory().total // 2**20
    b = stcs(
        "--adminAPIKey", ADMIN, "--dbMinFreeMemoryMB", str(total_mb * 2),
        "--queueTimeout", "1000", "--addressNewUsersPerMinute", "1",
        db=tmp_path / "db-b", name="b",
    )  # fmt: skip

    def get(server: StcsServer, token: str | None) -> int:
        headers = {"X-Chroma-Token": token} if token else {}
        return requests.get(f"{server.url}{HEARTBEAT}", headers=headers, timeout=30).status_code

    # A counter series born at its first increment is invisible to rate() until the next one:
    # make the 4xx and 5xx series exist before Prometheus first looks.
    assert get(a, None) == 401 and get(a, "t-error") == 503
    prometheus = prometheus_factory([a, b])
    window_start = time.time()

    # Bad tokens, auth server errors, a corrupt database's failed start and back-off.
    assert [get(a, None), get(a, "t-unknown"), get(a, "t-error")] == [401, 401, 503]
    assert [get(a, "t-broken"), get(a, "t-broken")] == [503, 503]
    # B: a start waits for free memory, then times out (503); the next new users from the
    # same address are refused at once (429, addressNewUsersPerMinute).
    assert get(b, new_token()) == 503
    assert [get(b, new_token()), get(b, new_token())] == [429, 429]
    # A user writes (two requests for one token: a cache hit), then hits their collection limit.
    alice = client_for(a, "t-alice")
    alice.heartbeat()
    # Her instance ready, her token cached: served in the relay's callbacks (relayFastPath;
    # route limits do not stop a read from being served so).
    assert get(a, "t-alice") == 200
    alice.create_collection("notes")
    refused = requests.post(
        f"{a.url}{COLLECTIONS}", json={"name": "more"}, headers={"X-Chroma-Token": "t-alice"}
    )
    assert refused.status_code == 422 and refused.json()["error"] == "QuotaError"
    # Another user's start queues for the only slot until the first instance has been idle for
    # dbTTL (2 s), which is when it is evicted, unless the idle cull gets there first (the same
    # threshold; the queue looks every 100 ms, the cull every 200 ms): try again, bounded.
    for turn in range(8):
        token = ["t-bob", "t-alice"][turn % 2]
        assert get(a, token) == 200
        if any(e["reason"] == "evicted" for e in a.events("instance stopped")):
            break
    else:
        raise AssertionError(f"no eviction in 8 turns: {a.events('instance stopped')}")
    traffic_end = time.time()
    _scraped_after(prometheus, traffic_end, 2)
    window_end = time.time() + SCRAPE_S

    dashboard = load_dashboard()
    # The variables' own queries (Grafana's label_values(metric, label)).
    jobs = prometheus.api("label/job/values", **{"match[]": "stcs_up"})
    assert jobs == ["stcs"]
    instances = prometheus.api("label/instance/values", **{"match[]": 'stcs_up{job="stcs"}'})
    assert sorted(instances) == sorted(f"127.0.0.1:{s.port}" for s in (a, b))

    exposition = requests.get(
        f"{a.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
    ).text
    empty, flat, missing = [], [], []
    queries = 0
    for panel in panels(dashboard):
        for target in panel["targets"]:
            expr = substitute(target["expr"])
            queries += 1
            where = f"{panel['title']!r} {target['refId']}: {expr}"
            if not prometheus.query(expr):
                empty.append(where)
            series = prometheus.query_range(expr, window_start, window_end)
            moved = {
                json.dumps(s["metric"], sort_keys=True)
                for s in series
                if any((v := _finite(value)) is not None and v > 0 for _, value in s["values"])
            }
            if not moved:
                flat.append(where)
            if panel["title"] in EXPECTED_SERIES:
                label, wanted = EXPECTED_SERIES[panel["title"]]
                seen = {json.loads(m).get(label) for m in moved}
                if not wanted <= seen:
                    missing.append(f"{where}: {label} {sorted(wanted - seen)} never moved")
            if panel["title"] in EVERY_VALUE:
                metric, label = EVERY_VALUE[panel["title"]]
                exported_values = set(
                    re.findall(rf'^{metric}{{{label}="(\w+)"}}', exposition, re.M)
                )
                shown_values = {s["metric"].get(label) for s in prometheus.query(expr)}
                if not exported_values or exported_values - shown_values:
                    missing.append(f"{where}: {label} {exported_values - shown_values} not shown")
    assert not empty, f"instant queries without data: {empty}"
    assert not flat, f"queries whose data never moved: {flat}"
    assert not missing, missing

    # Every metric stcs exports appears on the dashboard (its panels or its variables).
    exported = {
        name
        for line in exposition.splitlines()
        if (m := re.match(r"# TYPE (\w+) ", line))
        and not (name := m.group(1)).endswith("_created")  # prometheus-client's start times
    }
    text = DASHBOARD.read_text()
    assert {n for n in exported if not re.search(rf"\b{n}(_\w+)?\b", text)} == set()

    # The alert rules as Prometheus loaded them: healthy, and the four this traffic should
    # fire are firing (start failures, queue timeouts, memory floor, auth server errors).
    groups = prometheus.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == 5 and all(r["health"] == "ok" for r in rules), rules
    deadline = time.monotonic() + 10
    want = {
        "StcsInstanceStartFailures",
        "StcsQueueTimeouts",
        "StcsMemoryFloorReached",
        "StcsAuthServerErrors",
    }
    while True:
        alerts = prometheus.api("alerts")["alerts"]
        firing = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
        if firing == want:
            break
        assert time.monotonic() < deadline, alerts
        time.sleep(0.2)
    took = time.monotonic() - began
    shown = len(panels(dashboard))
    print(f"{queries} queries of {shown} panels; {turn + 1} queue turns; {took:.1f} s")
