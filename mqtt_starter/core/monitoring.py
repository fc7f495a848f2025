"""Watching every run, decided without I/O: what changed, what was published, who monitors.

The monitor asks QRS each interval for the execution results modified since a moment, with an
overlap so that a change committed late at the border is not lost. `RunLedger` turns those
answers into the changes to publish, each once:
- a result already seen in the same state is skipped (the overlap returns it again);
- after a restart or a handover the memory is empty, and the broker's retained task states
  say what was published: a result that is the published one, or was modified before it, is
  skipped. Everything is compared on QRS's clock (modifiedDate), never on ours.
`leader` elects the one monitoring instance among those online (DESIGN.md section 7).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from mqtt_starter.core.model import Execution, TaskRef, TaskStatus

STARTED_BY_US = "mqtt-starter"
STARTED_BY_OTHER = "other"
# What a failed or aborted run's event is called, by its final state.
EVENT_KINDS = {
    TaskStatus.FINISHED_FAIL: "failed",
    TaskStatus.ERROR: "failed",
    TaskStatus.ABORTED: "aborted",
}


def iso(moment: datetime) -> str:
    """QRS's time format: UTC with milliseconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def parse_iso(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


NO_DATE = datetime.min.replace(tzinfo=UTC)


def moment_of(text: str) -> datetime:
    """A QRS date as a moment, for comparing: dates come with and without milliseconds
    (`...24.827Z`, `...24Z`), which as text sort the wrong way round. Unreadable: the earliest."""
    return (parse_iso(text) if text else None) or NO_DATE


@dataclass(frozen=True)
class KnownRun:
    """What a task's retained state on the broker says was published last."""

    execution_id: str
    state_code: int
    updated_at: str  # the result's modifiedDate

    @classmethod
    def from_state(cls, data: Any) -> KnownRun | None:
        if not isinstance(data, Mapping):
            return None
        execution_id, code, updated = (
            data.get("executionId"),
            data.get("stateCode"),
            data.get("updatedAt"),
        )
        if not (isinstance(execution_id, str) and isinstance(code, int)):
            return None
        return cls(execution_id, code, updated if isinstance(updated, str) else "")


class RunLedger:
    """What the monitor has published, and where its next query starts."""

    def __init__(self, *, overlap_s: float, lookback_s: float, memory: int = 100_000) -> None:
        self.overlap = timedelta(seconds=overlap_s)
        self.lookback = timedelta(seconds=lookback_s)
        self.known: dict[str, KnownRun] = {}  # task id → its retained state
        self.cursor: str | None = None  # newest modifiedDate taken in (QRS's clock)
        self._seen: dict[str, tuple[int, str]] = {}  # result id → (status, modifiedDate)
        self._memory = memory

    def remember(self, task_id: str, run: KnownRun | None) -> None:
        """A retained state seen on the broker (None: cleared)."""
        if run is None:
            self.known.pop(task_id, None)
        else:
            self.known[task_id] = run

    def since(self, now: datetime) -> str:
        """Where the next query starts: the newest change taken in (else the newest retained
        state, else `lookback` before `now`), less the overlap."""
        base = parse_iso(self.cursor) if self.cursor else None
        if base is None:
            updated = [parse_iso(k.updated_at) for k in self.known.values() if k.updated_at]
            base = max((u for u in updated if u is not None), default=None)
        if base is None:
            base = now - self.lookback
        return iso(base - self.overlap)

    def changes(self, results: Iterable[Execution]) -> list[Execution]:
        """The results that are news, oldest change first."""
        fresh = [r for r in results if r.result_id and not self._published(r)]
        return sorted(
            fresh,
            key=lambda r: (moment_of(r.modified), moment_of(r.start_time or ""), r.result_id),
        )

    def _published(self, result: Execution) -> bool:
        seen = self._seen.get(result.result_id)
        if seen is not None:
            return seen[0] == int(result.status)
        known = self.known.get(result.task_id)
        if known is None:
            return False
        if known.execution_id == result.execution_id and known.state_code == int(result.status):
            return True
        return bool(
            result.modified
            and known.updated_at
            and moment_of(result.modified) < moment_of(known.updated_at)
        )

    def mark(self, result: Execution) -> None:
        """`result` was published."""
        self._seen[result.result_id] = (int(result.status), result.modified)

    def reopen(self, result: Execution) -> None:
        """Publishing `result` did not finish (the broker link broke): it is news again, and
        the next query reaches back to it."""
        self._seen.pop(result.result_id, None)
        if result.modified and (
            self.cursor is None or moment_of(result.modified) < moment_of(self.cursor)
        ):
            self.cursor = result.modified

    def taken_in(self, results: Sequence[Execution]) -> None:
        """Every change of an answer was published (or is not ours to publish): the cursor
        moves on, and what the overlap can no longer return is forgotten."""
        newest = max((r.modified for r in results if r.modified), key=moment_of, default=None)
        if newest is not None and (
            self.cursor is None or moment_of(newest) > moment_of(self.cursor)
        ):
            self.cursor = newest
        if len(self._seen) > self._memory and self.cursor is not None:
            oldest = moment_of(self.cursor) - 2 * self.overlap
            self._seen = {k: v for k, v in self._seen.items() if moment_of(v[1]) >= oldest}


@dataclass(frozen=True)
class Peer:
    """Another instance as its retained availability and info show it."""

    online: bool = False
    monitor: bool = False


def leader(own: str, peers: Mapping[str, Peer]) -> str:
    """The instance that monitors: of those online with the monitor on, the first by name."""
    return min({own} | {name for name, p in peers.items() if p.online and p.monitor})


def log_tail(text: str, lines: int) -> str:
    """The last `lines` non-empty lines of a script log."""
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:]) if lines > 0 else ""


def state_json(execution: Execution, task: TaskRef, started_by: str) -> dict[str, Any]:
    """The retained `<base>/state/task/<id>` payload (DESIGN.md section 7)."""
    return {
        "taskId": task.id,
        "taskName": task.name,
        "state": execution.state_name,
        "stateCode": int(execution.status),
        "executionId": execution.execution_id,
        "startTime": execution.start_time,
        "stopTime": execution.stop_time,
        "durationMs": execution.duration_ms,
        "startedBy": started_by,
        "updatedAt": execution.modified,
    }


def event_json(
    execution: Execution,
    task: TaskRef,
    *,
    started_by: str,
    request_id: str | None,
    reason: str,
) -> dict[str, Any]:
    """The `<base>/event/task/failed|aborted` payload (DESIGN.md section 7)."""
    return {
        "taskId": task.id,
        "taskName": task.name,
        "taskType": task.type_name,
        "appId": task.app_id or execution.app_id or None,
        "appName": task.app_name or None,
        "executionId": execution.execution_id,
        "state": execution.state_name,
        "stateCode": int(execution.status),
        "startTime": execution.start_time,
        "stopTime": execution.stop_time,
        "durationMs": execution.duration_ms,
        "startedBy": started_by,
        "requestId": request_id,
        "tags": list(task.tags),
        "customProperties": [{"name": c.name, "value": c.value} for c in task.custom_properties],
        "details": [
            {"detailsType": d.kind, "message": d.message, "detailCreatedDate": d.created}
            for d in execution.details
        ],
        "reason": reason,
    }


# How a finished run counts in the per-task series (DESIGN.md section 10).
OUTCOMES = {
    TaskStatus.FINISHED_SUCCESS: "success",
    TaskStatus.FINISHED_FAIL: "failure",
    TaskStatus.ERROR: "failure",
    TaskStatus.ABORTED: "aborted",
}


def run_outcome(status: TaskStatus) -> str | None:
    """`success`, `failure`, `aborted` or `other` for a run that ended; None while it runs."""
    if not status.terminal:
        return None
    return OUTCOMES.get(status, "other")
