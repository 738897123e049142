"""The core reports metrics through `stcs.recorder.Recorder`; only `stcs.metrics` knows
Prometheus (issue 20, item 6)."""

from __future__ import annotations

import ast
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

import stcs
from stcs.metrics import Metrics
from stcs.recorder import NullRecorder, Recorder

PACKAGE = Path(stcs.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_the_metrics_module_imports_prometheus_client() -> None:
    importers = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if any(name.split(".")[0] == "prometheus_client" for name in _imports(path))
    }
    assert importers == {"metrics.py"}


def test_the_core_takes_a_recorder_not_the_metrics() -> None:
    core = [PACKAGE / "supervisor.py", PACKAGE / "auth.py", *PACKAGE.glob("quotas*.py")]
    core += (PACKAGE / "quotas").glob("*.py")
    for path in core:
        assert "stcs.metrics" not in _imports(path), path


def test_the_metrics_module_does_not_import_the_supervisor() -> None:
    assert "stcs.supervisor" not in _imports(PACKAGE / "metrics.py")


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def test_each_reported_event_moves_its_prometheus_metric() -> None:
    metrics = Metrics()
    recorder: Recorder = metrics
    before = _samples(metrics)
    recorder.instance_start("ok", 0.08)
    recorder.instance_start("failed")
    recorder.instance_stop("idle")
    recorder.queue_wait(0.2)
    recorder.queue_timeout()
    recorder.memory_floor_wait()
    recorder.start_backoff()
    recorder.backoff_refusal()
    recorder.new_user_refusal()
    recorder.auth_lookup("cache_hit")
    recorder.quota_rejection("disk")
    after = _samples(metrics)
    moved = {key: after[key] - before.get(key, 0.0) for key in after}
    for key in [
        ("stcs_instance_starts_total", (("result", "ok"),)),
        ("stcs_instance_starts_total", (("result", "failed"),)),
        ("stcs_instance_start_duration_seconds_count", ()),
        ("stcs_instance_stops_total", (("reason", "idle"),)),
        ("stcs_queue_wait_seconds_count", ()),
        ("stcs_queue_timeouts_total", ()),
        ("stcs_memory_floor_waits_total", ()),
        ("stcs_start_backoffs_total", ()),
        ("stcs_backoff_refusals_total", ()),
        ("stcs_new_user_refusals_total", ()),
        ("stcs_auth_lookups_total", (("result", "cache_hit"),)),
        ("stcs_quota_rejections_total", (("limit", "disk"),)),
    ]:
        assert moved[key] == 1, key


def test_the_null_recorder_takes_every_event() -> None:
    recorder: Recorder = NullRecorder()
    recorder.instance_start("ok", 0.1)
    recorder.quota_rejection("rate")


def test_request_counts_and_durations_render_as_prometheus_families() -> None:
    """The request counter and histogram are plain numbers on the hot path (issue 24) and
    render as prometheus-client's Counter and Histogram did (this test passed against both):
    ``_total`` by method and status class, cumulative ``le`` buckets (an observation on a
    bound counts in that bound's bucket), ``_count`` and ``_sum``."""
    metrics = Metrics()
    metrics.observe_request("GET", 200, 0.001)  # on the first bound: le="0.001"
    metrics.observe_request("GET", 204, 0.0011)
    metrics.observe_request("POST", 503, 7.0)
    metrics.observe_request("GET", 404, 100.0)  # above every bound: only +Inf
    samples = _samples(metrics)

    def method_class(method: str, status_class: str) -> tuple[tuple[str, str], ...]:
        return (("method", method), ("status_class", status_class))

    def bucket(le: str) -> float:
        return samples[("stcs_request_duration_seconds_bucket", (("le", le),))]

    assert samples[("stcs_requests_total", method_class("GET", "2xx"))] == 2
    assert samples[("stcs_requests_total", method_class("POST", "5xx"))] == 1
    assert samples[("stcs_requests_total", method_class("GET", "4xx"))] == 1
    assert bucket("0.001") == 1
    assert bucket("0.0025") == 2
    assert bucket("5.0") == 2
    assert bucket("10.0") == 3
    assert bucket("60.0") == 3
    assert bucket("+Inf") == 4
    assert samples[("stcs_request_duration_seconds_count", ())] == 4
    assert abs(samples[("stcs_request_duration_seconds_sum", ())] - 107.0021) < 1e-9
