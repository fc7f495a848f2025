"""The start pacer, on a clock the test sets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mqtt_starter.core.pacing import StartPacer


def test_starts_beyond_the_limit_wait_for_the_oldest_to_leave_the_window() -> None:
    pacer = StartPacer(3, window_s=60)
    for t in (0.0, 1.0, 2.0):
        assert pacer.delay(t) == 0
        pacer.started(t)
    assert pacer.delay(10.0) == 50.0
    assert pacer.delay(60.0) == 0.0  # the start at 0 left the window
    pacer.started(60.0)
    assert pacer.delay(60.5) == 0.5


def test_retry_after_blocks_every_start() -> None:
    pacer = StartPacer(50)
    pacer.blocked(100.0, 7)
    assert pacer.delay(101.0) == 6.0
    assert pacer.delay(107.0) == 0.0


@given(st.integers(1, 20), st.lists(st.floats(0, 5), min_size=1, max_size=200))
def test_no_window_ever_holds_more_than_the_limit(limit: int, gaps: list[float]) -> None:
    pacer = StartPacer(limit, window_s=10)
    now, starts = 0.0, []
    for gap in gaps:
        now += gap
        now += pacer.delay(now)
        pacer.started(now)
        starts.append(now)
    for i, t in enumerate(starts):
        assert sum(1 for s in starts[i:] if s < t + 10) <= limit
