"""Which runs this daemon started, and for which request: what the monitor's status events
say in `startedBy` and `requestId`. When another instance monitors, this one tells it of each
run it starts (the announcer publishes a claim).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

# Enough for the runs of many intervals, bounded so that memory does not grow with the runs.
CLAIMS_KEPT = 10_000


class Claims:
    """The runs started here (or, told by it, by another instance), by execution id."""

    def __init__(self) -> None:
        self._claims: OrderedDict[str, str | None] = OrderedDict()
        # Tells the monitoring instance which runs this one started (set by the daemon).
        self.announcer: Callable[[str, str | None], Awaitable[None]] | None = None

    def claim(self, execution_id: str, request_id: str | None) -> None:
        """This daemon (or, told by it, another instance) started the execution, for the
        request `request_id`."""
        self._claims[execution_id.lower()] = request_id
        if len(self._claims) > CLAIMS_KEPT:
            self._claims.popitem(last=False)

    async def started(self, execution_id: str, request_id: str | None) -> None:
        """This daemon started the execution: remember it, and tell the monitoring instance."""
        self.claim(execution_id, request_id)
        if self.announcer is not None:
            await self.announcer(execution_id, request_id)

    def claimed(self, execution_id: str) -> tuple[bool, str | None]:
        """(whether this daemon started the execution, the requestId it started it for)."""
        if execution_id in self._claims:
            return True, self._claims[execution_id]
        return False, None
