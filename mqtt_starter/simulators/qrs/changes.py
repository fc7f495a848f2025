"""When each simulated execution result last changed (its `modifiedDate`), indexed in time order
so that "what changed since" is answered without a scan of every result; and how this server
writes and reads dates (Variants: with or without milliseconds, filter literals read as UTC or
as its local time).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from mqtt_starter.simulators.qrs.fixtures import Variants


def parse_date(text: str) -> datetime | None:
    """A QRS date (with or without milliseconds, `Z` or an offset) as an aware datetime."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def now_iso(milliseconds: bool = True) -> str:
    now = datetime.now(UTC)
    if not milliseconds:
        return now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class ChangeIndex:
    """(modifiedDate, result id) of every change, in time order."""

    def __init__(
        self, variants: Callable[[], Variants], results: dict[str, dict[str, Any]]
    ) -> None:
        self._variants = variants
        self._results = results  # every kept result by id (the state's, shared)
        self._changes: list[tuple[datetime, str]] = []

    def now(self) -> str:
        return now_iso(self._variants().date_milliseconds)

    def filter_moment(self, literal: str) -> datetime | None:
        """The moment a date literal of a filter stands for, read as this server reads it
        (as UTC, or as its local time: Variants.date_filter_offset_s)."""
        moment = parse_date(literal)
        if moment is None:
            return None
        return moment - timedelta(seconds=self._variants().date_filter_offset_s)

    def since(self, literal: str) -> list[dict[str, Any]]:
        """The kept results modified at or after the moment `literal` names."""
        moment = self.filter_moment(literal)
        if moment is None:
            return []
        start = bisect.bisect_left(self._changes, (moment, ""))
        ids = dict.fromkeys(result_id for _, result_id in self._changes[start:])
        return [r for i in ids if (r := self._results.get(i)) is not None]

    def changed(self, result: dict[str, Any]) -> None:
        """`result` changed now."""
        result["modifiedDate"] = self.now()
        moment = parse_date(result["modifiedDate"])
        assert moment is not None
        self._changes.append((moment, result["id"]))
        if len(self._changes) > 4 * len(self._results) + 1000:
            # Keep one entry per kept result, the newest, in time order.
            self._changes = sorted(
                (d, i)
                for i, r in self._results.items()
                if (d := parse_date(r["modifiedDate"])) is not None
            )
