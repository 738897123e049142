"""The start back-off's schedule (1 s doubling to 60 s) on the supervisor with a launcher that
always fails, in-process.  Real failing children: tests/e2e/test_backoff.py."""

from __future__ import annotations

from stcs.errors import StartBackoffError, StartFailedError
from stcs.holds import BACKOFF_MAX_S
from stcs.launcher import Child
from stcs.supervisor import Supervisor
from tests.tally import Tally


class FailingLauncher:
    """A launcher whose starts all fail (as chroma with a corrupt database): counts them."""

    def __init__(self) -> None:
        self.launches = 0

    async def launch(self, user_id: str) -> Child:
        self.launches += 1
        raise StartFailedError("the user's chroma server failed to start")

    async def stop(self, child: Child) -> int:  # pragma: no cover - nothing ever starts
        raise AssertionError("nothing to stop")

    def rotate_log(self, child: Child) -> None:  # pragma: no cover
        pass

    async def probe(self, child: Child, timeout_s: float) -> bool:  # pragma: no cover
        return False

    def kill(self, child: Child) -> None:  # pragma: no cover
        pass


async def test_failed_starts_back_off_exponentially_up_to_the_cap() -> None:
    now = [1000.0]
    launcher = FailingLauncher()
    sup = Supervisor(
        launcher,
        ttl_ms=60000,
        max_instances=5,
        queue_timeout_ms=1000,
        clock=lambda: now[0],
        recorder=(tally := Tally()),
    )

    async def attempt() -> str | None:
        try:
            async with sup.acquire("u1"):
                raise AssertionError("a start succeeded")
        except StartBackoffError as exc:
            return str(exc.retry_after_s)
        except StartFailedError:
            return None

    assert await attempt() is None and launcher.launches == 1
    for _ in range(20):  # requests during the back-off spawn nothing
        assert await attempt() == "1"
    assert launcher.launches == 1
    expected = [2, 4, 8, 16, 32, 60, 60]
    for delay in expected:
        now[0] += BACKOFF_MAX_S  # past any back-off
        assert await attempt() is None  # one start is tried, and fails
        assert await attempt() == str(delay)
    assert launcher.launches == 1 + len(expected)
    assert tally["backoff_refusal"] == 20 + len(expected)
    sup.release_hold("u1")  # an admin hold's end (a restore) clears the series
    assert await attempt() is None
    await sup.close()
