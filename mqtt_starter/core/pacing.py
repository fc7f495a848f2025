"""The start rate of a Qlik Cloud tenant: at most `limit` reload starts in any `window_s`.

Pure: given `now`, says how long the next start must wait; the shell sleeps. Starts pass one
at a time in the order they came (the client holds a FIFO lock around pace, wait and POST), so
a start that waits is never overtaken and never dropped.
"""

from __future__ import annotations

import math
from collections import deque


def _until(moment: float, now: float) -> float:
    """A wait that brings `now` to `moment` at least, in floats too: `now + (moment - now)`
    can fall one ulp short of `moment`."""
    wait = max(moment - now, 0.0)
    while now + wait < moment:
        wait = math.nextafter(wait, math.inf)
    return wait


class StartPacer:
    """At most `limit` starts in any `window_s`, in order."""

    def __init__(self, limit: int, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._starts: deque[float] = deque()
        self._blocked_until = 0.0

    def delay(self, now: float) -> float:
        """Seconds until the next start may go."""
        while self._starts and self._starts[0] <= now - self.window_s:
            self._starts.popleft()
        wait = _until(self._blocked_until, now)
        if len(self._starts) >= self.limit:
            # The limit-th newest start must have left the window (not merely the oldest:
            # float rounding may keep a start one ulp past the window's edge).
            wait = max(wait, _until(self._starts[-self.limit] + self.window_s, now))
        return wait

    def started(self, now: float) -> None:
        self._starts.append(now)

    def blocked(self, now: float, retry_after_s: float) -> None:
        """The tenant answered 429 with Retry-After: nothing starts before then."""
        self._blocked_until = max(self._blocked_until, now + retry_after_s)
