"""The requestId memory: which requests were handled (a repeat is answered from it), and which
are being handled (a repeat that comes meanwhile waits for the first).

A repeat is the same requestId with the same ask (`core.policy.request_key`); the same
requestId with another ask is a new request, logged as such. What a passing condition refused
(QRS down, a bug) is not remembered: the same request is served once the condition is gone.
At most `policy.dedupe_max_entries` are kept, each for `policy.dedupe_window_s`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from loguru import logger

from mqtt_starter.core.model import Reply
from mqtt_starter.core.policy import ExpiringMemory

# Error codes of a passing condition: such a refusal is not remembered for the requestId.
PASSING = ("qrs_unavailable", "internal")


@dataclass
class Record:
    """What is remembered of a handled request."""

    reply: Reply
    finished: asyncio.Future[Reply] | None = None  # set while or once its runs are followed


class RequestMemory:
    """Handled and in-flight requests by their key, bounded in time and number."""

    def __init__(
        self, window_s: float, capacity: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._answered: ExpiringMemory[Hashable, Record] = ExpiringMemory(window_s, capacity)
        # The ask each requestId came with last: a different one is logged as a new request.
        self._asks: ExpiringMemory[str, Hashable] = ExpiringMemory(window_s, capacity)
        self._pending: dict[Hashable, asyncio.Future[Record | None]] = {}

    def configure(self, window_s: float, capacity: int) -> None:
        """The settings after a reload."""
        self._answered.window_s = self._asks.window_s = window_s
        self._answered.capacity = self._asks.capacity = capacity

    def note(self, request_id: str, key: Hashable, door: str, topic: str) -> None:
        """The ask `request_id` comes with now; another ask than before is logged."""
        earlier = self._asks.get(request_id, self._clock())
        if earlier is not None and earlier != key:
            logger.info(
                "requestId={} came before with another request ({} {}): served as a new one",
                request_id,
                door,
                topic,
            )
        self._asks.put(request_id, key, self._clock())

    async def recall_or_serve(
        self, key: Hashable, serve: Callable[[], Awaitable[Record]]
    ) -> tuple[Record, bool]:
        """(the record, True) for a repeat; else `serve()`'s record, remembered, and False."""
        while True:
            known = self._answered.get(key, self._clock())
            if known is not None:
                return known, True
            first = self._pending.get(key)
            if first is None:
                break
            # The same request is being handled: wait for its answer, then look again: it is
            # remembered (a repeat), or it failed and this one is served in its own right (or
            # waits for a third that got in first).
            await asyncio.shield(first)
        pending: asyncio.Future[Record | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = pending
        record: Record | None = None
        try:
            record = await serve()
        finally:
            del self._pending[key]
            pending.set_result(record)
        error = record.reply.error
        if error is None or error.code not in PASSING:
            self._answered.put(key, record, self._clock())
        return record, False
