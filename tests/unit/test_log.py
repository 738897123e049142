"""stcs's own events through `stcs.log.configure`'s chain (one processor since issue 24): what a
line carries, what it hides, clips and drops."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from stcs import log as stcs_log

USER = "9b2c6b8e-3a57-4a5e-9a43-1234567890ab"


@pytest.fixture
def lines(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "stcs.log"
    stcs_log.configure("info", str(path), json=True, user_ids_are_secret=True)
    structlog.contextvars.clear_contextvars()
    yield path
    structlog.contextvars.clear_contextvars()
    stcs_log.configure("info", json=True)


def _read(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_line_carries_level_logger_timestamp_and_the_context(lines: Path) -> None:
    structlog.contextvars.bind_contextvars(request_id="r1", user_id=USER)
    structlog.get_logger("stcs.relay").warn("slow", took_ms=3)
    (line,) = _read(lines)
    assert line["event"] == "slow" and line["took_ms"] == 3
    assert line["level"] == "warning"  # structlog's add_log_level maps the alias
    assert line["logger"] == "stcs.relay"
    assert str(line["timestamp"]).endswith("Z") and len(str(line["timestamp"])) == 27
    assert line["request_id"] == "r1"
    assert line["user_id"] == stcs_log.user_ref(USER)  # from the context, hidden all the same


def test_user_ids_are_hidden_and_client_values_clipped(lines: Path) -> None:
    log = structlog.get_logger("stcs.relay")
    log.info("request", user_id=USER, path="/a\x1b[2J" + "x" * 400, client="1.2.3.4")
    (line,) = _read(lines)
    assert line["user_id"] == stcs_log.user_ref(USER)
    assert USER not in lines.read_text()
    path = str(line["path"])
    assert "\x1b" not in path and path.startswith("/a\\x1b[2J") and path.endswith("\u2026")
    assert len(path) == stcs_log.CLIENT_VALUE_MAX + 1
    assert line["path_len"] == 406


def test_below_the_level_nothing_is_written_and_set_level_changes_it(lines: Path) -> None:
    log = structlog.get_logger("stcs.test")
    log.debug("hidden")
    stcs_log.set_level("debug")
    try:
        log.debug("shown")
    finally:
        stcs_log.set_level("info")
    log.debug("hidden again")
    assert [line["event"] for line in _read(lines)] == ["shown"]


def test_an_exception_is_formatted_into_the_line(lines: Path) -> None:
    log = structlog.get_logger("stcs.test")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    (line,) = _read(lines)
    assert line["level"] == "error"
    assert "ValueError: boom" in str(line["exception"])
    assert "exc_info" not in line


def test_stdlib_records_get_level_logger_and_timestamp(lines: Path) -> None:
    """Other libraries' records (aiohttp's) are rendered like stcs's events."""
    logging.getLogger("aiohttp.server").warning("peer sent %s", "x")
    logging.getLogger("aiohttp.client").error("bad")
    first, second = _read(lines)
    assert first["event"] == "peer sent x" and first["logger"] == "aiohttp.server"
    assert first["level"] == "warning" and str(first["timestamp"]).endswith("Z")
    assert second["level"] == "error" and second["logger"] == "aiohttp.client"


def test_a_console_traceback_shows_no_local_values(tmp_path: Path) -> None:
    """In UUID mode a user id is the user's token: a traceback rendered for a terminal must not
    print the frames' local variables, where ids and tokens live (found in review: structlog's
    console renderer used rich's traceback with locals)."""
    path = tmp_path / "console.log"
    stcs_log.configure("info", str(path), json=False, user_ids_are_secret=True)
    try:

        def resolve(token: str) -> None:
            raise ValueError("no such user")

        try:
            resolve(USER)
        except ValueError:
            structlog.get_logger("stcs.test").exception("lookup failed")
    finally:
        stcs_log.configure("info", json=True)
    text = path.read_text()
    assert "no such user" in text and "lookup failed" in text
    assert USER not in text
