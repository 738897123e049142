"""The per-address log budget for refused requests (`stcs.log.RefusalLog`) on an injected clock,
and the console renderer's escaping.  The attacks themselves: tests/e2e/test_refusals.py."""

from __future__ import annotations

import structlog

from stcs import log as stcs_log


def test_the_console_renderer_gets_no_control_characters() -> None:
    """The processor escapes what a terminal would act on (newline, ESC) and clips."""
    event = {"event": "request", "path": "/a\n\x1b[31mred" + "x" * 1000, "client": "1.2.3.4"}
    out = stcs_log.clip_client_values(None, "info", dict(event))
    assert out["client"] == "1.2.3.4" and "client_len" not in out
    assert out["path"].isprintable()
    assert out["path"].startswith("/a\\n\\x1b[31mred")
    assert out["path_len"] == len(event["path"])
    assert len(out["path"]) <= stcs_log.CLIENT_VALUE_MAX + 16


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_refusal_budget_per_address_burst_then_rate() -> None:
    """Policy (injected clock): an address gets a burst of 4 s worth of lines, then its rate;
    another address has its own budget; what is not logged is summed up by address."""
    clock = _Clock()
    budget = stcs_log.RefusalLog(5, 10, clock=clock)
    admitted = sum(budget.admit("10.0.0.2", 401) for _ in range(1000))
    assert admitted == 20  # the burst
    assert budget.admit("10.0.0.1", 400)  # another address: its own bucket
    clock.now += 1.0
    assert sum(budget.admit("10.0.0.2", 431) for _ in range(1000)) == 5
    with structlog.testing.capture_logs() as logs:
        budget.flush()
        budget.flush()  # nothing more counted: no second line
    assert len(logs) == 1
    summary = logs[0]
    assert summary["event"] == "requests not logged"
    assert summary["count"] == 980 + 995
    assert summary["clients"] == {"10.0.0.2": {"401": 980, "431": 995}}
    assert summary["statuses"] == {"401": 980, "431": 995}


def test_refusal_budget_is_bounded_in_addresses_and_in_total() -> None:
    """Many addresses (an IPv6 client rotating them) gain nothing past the total budget (10
    addresses' worth), and the tables stay within ``max_clients``."""
    clock = _Clock()
    budget = stcs_log.RefusalLog(1, 10, max_clients=100, clock=clock)
    admitted = sum(budget.admit(f"2001:db8::{i:x}", 401) for i in range(10_000))
    assert admitted == 4 * 10  # total: 10 x the per-address burst of 4
    assert len(budget._buckets) <= 100 and len(budget._dropped) <= 101
    with structlog.testing.capture_logs() as logs:
        budget.flush()
    assert logs[0]["count"] == 10_000 - admitted
    assert len(logs[0]["clients"]) == stcs_log.RefusalLog.SUMMARY_CLIENTS
    assert logs[0]["other_clients"] > 0
    off = stcs_log.RefusalLog(0, 10, clock=clock)
    assert all(off.admit("10.0.0.2", 401) for _ in range(1000))  # 0: every line
