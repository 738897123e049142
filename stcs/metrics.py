"""Prometheus metrics (prometheus-client), served at ``GET /metrics`` with the admin key.

One registry per application (not the global one), so several apps in one process (tests)
do not collide.  No label carries a user id: cardinality stays bounded whatever the number of
users.  Times are seconds, sizes bytes (Prometheus base units).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from stcs.snapshot import Phase, Snapshot

if TYPE_CHECKING:
    from stcs.ports import PortCounts

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_START_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2, 5, 10, 20)
_QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_MB = 1024 * 1024
_DISK_BUCKETS = tuple(n * _MB for n in (1, 10, 100, 1024, 10 * 1024, 100 * 1024))

# `limit` label values of stcs_quota_rejections (the limits of stcs.quotas).
QUOTA_LIMITS = ("disk", "collections", "records", "rate", "concurrency")


def _count_of(counts: Callable[[], PortCounts], name: str) -> float:
    return float(getattr(counts(), name))


class _DiskCollector(Collector):
    """The users' data sizes as a gauge histogram, read at scrape time (a distribution across
    users now, not accumulated over time)."""

    def __init__(self, sizes: Callable[[], Iterable[int]]) -> None:
        self._sizes = sizes

    def collect(self) -> Iterable[Metric]:
        sizes = list(self._sizes())
        buckets = [
            (str(float(bound)), sum(1 for s in sizes if s <= bound)) for bound in _DISK_BUCKETS
        ]
        buckets.append(("+Inf", len(sizes)))
        yield GaugeHistogramMetricFamily(
            "stcs_user_disk_bytes",
            "Users by the size of their data (as userMaxDiskMB counts it), last measurement.",
            buckets=buckets,
            gsum_value=sum(sizes),
        )


class RequestCounts(Collector):
    """``stcs_requests_total`` (by method and status class),
    ``stcs_request_duration_seconds`` (a histogram over `_REQUEST_BUCKETS`) and
    ``stcs_relay_callback_requests_total`` (``in_callbacks``: how many of the requests the relay
    began to proxy in its callbacks, `stcs.relay.handler.Exchange`), kept as plain numbers and
    turned into metric families at scrape time.

    On the data plane's hot path (one `observe` per request): a dict update and a bisect,
    where a labelled ``Counter`` and a ``Histogram`` took four locks and a loop over the
    buckets in Python (~17k instructions a request, callgrind; issue 24).  Only the event
    loop's thread observes, so no lock is needed; a scrape reads a consistent enough copy
    (Prometheus counters are monotonic, a scrape between two updates is still valid).  The
    families are the Counter's and the Histogram's but for their ``_created`` samples (the
    process start is ``process_start_time_seconds``).
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.buckets = [0] * (len(_REQUEST_BUCKETS) + 1)  # the last: above every bound
        self.total_seconds = 0.0
        self.in_callbacks = 0  # of them, served in the relay's callbacks (`relayFastPath`)

    def observe(self, method: str, status: int, seconds: float) -> None:
        """One answered request: ``method``, ``status`` (its class is the label), ``seconds``
        to its last byte."""
        key = (method, f"{status // 100}xx")
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        self.buckets[bisect.bisect_left(_REQUEST_BUCKETS, seconds)] += 1
        self.total_seconds += seconds

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "stcs_requests", "Requests answered.", labels=["method", "status_class"]
        )
        for (method, status_class), count in sorted(self.counts.items()):
            requests.add_metric([method, status_class], count)
        yield requests
        cumulative, buckets = 0, []
        bounds = (*map(floatToGoString, _REQUEST_BUCKETS), "+Inf")  # as Histogram writes them
        for bound, count in zip(bounds, self.buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "stcs_request_duration_seconds",
            "Time to answer a request (to its last byte).",
            buckets=buckets,
            sum_value=self.total_seconds,
        )
        yield CounterMetricFamily(
            "stcs_relay_callback_requests",
            "Requests the relay began to proxy in its callbacks, without a task (relayFastPath).",
            value=self.in_callbacks,
        )


class _LiveCollector(Collector):
    """Values read at scrape time: running and starting instances, queue length, children's
    RSS."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snapshot = self._snapshot()
        running, queued = snapshot.slots_used, snapshot.queue_length
        pids = [view.pid for view in snapshot.instances if view.pid is not None]
        yield GaugeMetricFamily(
            "stcs_instances_running", "Chroma instances holding a slot.", value=running
        )
        yield GaugeMetricFamily(
            "stcs_queue_length", "Instance starts waiting for a slot.", value=queued
        )
        starting = sum(1 for view in snapshot.instances if view.phase is Phase.STARTING)
        yield GaugeMetricFamily(
            "stcs_instances_starting",
            "Chroma instances starting (those waiting for a slot included).",
            value=starting,
        )
        rss = 0
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                rss += psutil.Process(pid).memory_info().rss
        yield GaugeMetricFamily(
            "stcs_children_rss_bytes", "Resident memory of all chroma children.", value=rss
        )


class Metrics:
    """The metrics of one stcs application: the Prometheus `stcs.recorder.Recorder` (the core
    reports events through its methods) and the scrape-time values (call `bind` once the
    supervisor exists)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = RequestCounts()
        r.register(self.requests)
        self.starts = Counter(
            "stcs_instance_starts", "Chroma instance starts.", ["result"], registry=r
        )
        self.start_duration = Histogram(
            "stcs_instance_start_duration_seconds",
            "Spawn to first good heartbeat.",
            buckets=_START_BUCKETS,
            registry=r,
        )
        self.stops = Counter(
            "stcs_instance_stops", "Chroma instances stopped.", ["reason"], registry=r
        )
        self.queue_wait_seconds = Histogram(
            "stcs_queue_wait_seconds",
            "Time a start waited for an instance slot.",
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self.queue_timeouts = Counter(
            "stcs_queue_timeouts", "Starts that gave up waiting (503 RateLimitError).", registry=r
        )
        self.memory_floor = Counter(
            "stcs_memory_floor_waits",
            "Starts that had to wait because of dbMinFreeMemoryMB.",
            registry=r,
        )
        self.start_backoffs = Counter(
            "stcs_start_backoffs",
            "Back-offs begun: a user's start failed or their chroma crashed soon after it.",
            registry=r,
        )
        self.backoff_refusals = Counter(
            "stcs_backoff_refusals",
            "Requests answered 503 at once because their user's starts back off.",
            registry=r,
        )
        self.new_user_refusals = Counter(
            "stcs_new_user_refusals",
            "New users' starts refused (429) by addressNewUsersPerMinute.",
            registry=r,
        )
        self.auth_lookups = Counter(
            "stcs_auth_lookups",
            "Token resolutions by result (ok, rejected, error, saturated, cache_hit, "
            "abandoned: nobody waited any more, per_address: refused by "
            "authMaxLookupsPerAddress).",
            ["result"],
            registry=r,
        )
        self.quota_rejections = Counter(
            "stcs_quota_rejections",
            "Requests refused by a per-user limit, by limit (disk, collections, records: 422 "
            "QuotaError; rate, concurrency: 429 RateLimitError).",
            ["limit"],
            registry=r,
        )
        self._auth_children: dict[str, Any] = {}
        self.info = Gauge("stcs_up", "1 while stcs serves.", registry=r)
        self.info.set(1)
        # Pre-create the label sets alerts refer to, so they exist (at 0) from the start.
        for result in ("ok", "failed", "abandoned"):
            self.starts.labels(result)
        for reason in (
            "idle",
            "evicted",
            "crashed",
            "shutdown",
            "admin",
            "unreachable",
            "wedged",
            "memory",
        ):
            self.stops.labels(reason)
        for result in (
            "ok",
            "rejected",
            "error",
            "saturated",
            "cache_hit",
            "abandoned",
            "per_address",
        ):
            self.auth_lookups.labels(result)
        for limit in QUOTA_LIMITS:
            self.quota_rejections.labels(limit)

    def bind(self, snapshot: Callable[[], Snapshot]) -> None:
        """Register the scrape-time values, read from ``snapshot()`` (`Supervisor.snapshot`)."""
        self.registry.register(_LiveCollector(snapshot))

    def bind_ports(self, counts: Callable[[], PortCounts]) -> None:
        """Register ``stcs_child_ports_*`` (held, lent, foreign), read from ``counts()``
        (`ports.PortHold.counts`)."""
        for name, doc in (
            ("held", "Ports of childPortRange stcs holds (bound, not listening) for children."),
            ("lent", "Ports given to chroma children (with or without childPortRange)."),
            (
                "foreign",
                "Ports of childPortRange bound by another process: no child can start on them.",
            ),
        ):
            gauge = Gauge(f"stcs_child_ports_{name}", doc, registry=self.registry)
            gauge.set_function(functools.partial(_count_of, counts, name))

    def bind_disk(self, sizes: Callable[[], Iterable[int]]) -> None:
        """Register the users' data sizes (bytes, one per user) for ``stcs_user_disk_bytes``."""
        self.registry.register(_DiskCollector(sizes))

    def observe_request(self, method: str, status: int, seconds: float) -> None:
        self.requests.observe(method, status, seconds)

    # -- stcs.recorder.Recorder ------------------------------------------------------------

    def instance_start(self, result: str, seconds: float | None = None) -> None:
        self.starts.labels(result).inc()
        if seconds is not None:
            self.start_duration.observe(seconds)

    def instance_stop(self, reason: str) -> None:
        self.stops.labels(reason).inc()

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)

    def queue_timeout(self) -> None:
        self.queue_timeouts.inc()

    def memory_floor_wait(self) -> None:
        self.memory_floor.inc()

    def start_backoff(self) -> None:
        self.start_backoffs.inc()

    def backoff_refusal(self) -> None:
        self.backoff_refusals.inc()

    def new_user_refusal(self) -> None:
        self.new_user_refusals.inc()

    def auth_lookup(self, result: str) -> None:
        child = self._auth_children.get(result)
        if child is None:  # labels() takes a lock and builds a key: once per result
            child = self._auth_children[result] = self.auth_lookups.labels(result)
        child.inc()

    def quota_rejection(self, limit: str) -> None:
        self.quota_rejections.labels(limit).inc()

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)
