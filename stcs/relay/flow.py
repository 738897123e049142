"""Back-pressure on one client connection, both ways (uvicorn's ``FlowControl``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class FlowControl:
    """Whether the client's socket is read (``reading_paused``, with ``backlog``: bytes read
    but not parsed yet, kept while reading is paused) and written (``writable``, cleared by
    ``pause_writing``; ``send_timer`` runs meanwhile: past ``sendTimeout`` the connection is
    aborted)."""

    __slots__ = ("backlog", "reading_paused", "send_timer", "transport", "writable")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.reading_paused = False
        self.backlog = b""
        self.writable = asyncio.Event()
        self.writable.set()
        self.send_timer: asyncio.TimerHandle | None = None

    def pause_reading(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self.transport.resume_reading()

    def read_to_discard(self) -> None:
        """Read again, whatever was decided before: what comes is discarded (lingering)."""
        self.reading_paused = False
        self.transport.resume_reading()

    def pause_writing(
        self, loop: asyncio.AbstractEventLoop, timeout_s: float, on_timeout: Callable[[], None]
    ) -> None:
        """The client's socket buffer is full: ``on_timeout`` after ``timeout_s`` unless it
        reads before (`resume_writing`)."""
        self.writable.clear()
        if self.send_timer is None:
            self.send_timer = loop.call_later(timeout_s, self._send_timed_out, on_timeout)

    def _send_timed_out(self, on_timeout: Callable[[], None]) -> None:
        self.send_timer = None
        on_timeout()

    def resume_writing(self) -> None:
        self.writable.set()
        self.cancel_send_timer()

    def cancel_send_timer(self) -> None:
        if self.send_timer is not None:
            self.send_timer.cancel()
            self.send_timer = None

    def lost(self) -> None:
        """The connection is gone: no timer left, and no writer waits for ever."""
        self.cancel_send_timer()
        self.writable.set()
