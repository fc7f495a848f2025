"""The simulated execution results (qrs-api.md section 4): one per attempt, with its details,
its state changes (each one noted in the index of changes) and, when an attempt that started
ends, its script log.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from mqtt_starter.simulators.qrs.changes import ChangeIndex
from mqtt_starter.simulators.qrs.logs import ScriptLogs

if TYPE_CHECKING:
    from mqtt_starter.simulators.qrs.state import Session

EMPTY_GUID = "00000000-0000-0000-0000-000000000000"
NEVER = "1753-01-01T00:00:00.000Z"
STARTED = 2
_STATE_NAMES = {
    1: "Triggered",
    2: "Started",
    3: "Queued",
    4: "AbortInitiated",
    5: "Aborting",
    6: "Aborted",
    7: "FinishedSuccess",
    8: "FinishedFail",
    10: "Retry",
}
_TERMINAL = {6, 7, 8, 9, 11, 12}


def stable_id(*parts: str) -> str:
    """The same id for the same parts, run after run (tags, apps, custom properties)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "qrs-sim:" + ":".join(parts)))


class Results:
    """Every kept result by execution (session) id and by result id."""

    # Set by the state once its index of changes and its script logs exist.
    changes: ChangeIndex
    script_logs: ScriptLogs

    def __init__(self) -> None:
        self.executions: dict[str, list[dict[str, Any]]] = {}
        self.by_id: dict[str, dict[str, Any]] = {}

    def by_file_reference(self, file_reference: str) -> dict[str, Any] | None:
        return next(
            (r for r in self.by_id.values() if r["fileReferenceID"] == file_reference), None
        )

    def new(self, session: Session, status: int) -> dict[str, Any]:
        """A new result (attempt) of the session, in `status`."""
        task = session.task
        result: dict[str, Any] = {
            "id": str(uuid.uuid4()),
            "taskID": task.id,
            "executionID": session.id,
            "appID": stable_id("app", task.spec.app or task.spec.name)
            if task.spec.type == "reload"
            else EMPTY_GUID,
            "fileReferenceID": EMPTY_GUID,
            "status": status,
            "startTime": NEVER,
            "stopTime": NEVER,
            "duration": 0,
            "executingNodeName": "sim-node",
            # Set when a reload attempt ends and its script log is written.
            "scriptLogAvailable": False,
            "scriptLogLocation": "",
            "scriptLogSize": 0,
            "details": [],
            "createdDate": self.changes.now(),
            "modifiedDate": "",
            "schemaPath": "ExecutionResult",
        }
        result["_task"] = task
        self.detail(result, 2, f"Changing task state to {_STATE_NAMES[status]}")
        self.executions.setdefault(session.id, []).append(result)
        self.by_id[result["id"]] = result
        task.set_last_result(result)
        return result

    def detail(self, result: dict[str, Any], kind: int, message: str) -> None:
        result["details"].append(
            {"detailsType": kind, "message": message, "detailCreatedDate": self.changes.now()}
        )
        result["_task"].changed()
        self.changes.changed(result)

    def set(self, result: dict[str, Any], status: int) -> None:
        """Move the result to `status`, with its detail; a terminal one writes its log."""
        self.detail(
            result,
            2,
            f"Changing task state from {_STATE_NAMES[result['status']]} to {_STATE_NAMES[status]}",
        )
        result["status"] = status
        if status == STARTED:
            result["startTime"] = self.changes.now()
            result["_t0"] = time.monotonic()
        if status in _TERMINAL:
            result["stopTime"] = self.changes.now()
            if result["startTime"] == NEVER:
                result["startTime"] = result["stopTime"]
            t0 = result.pop("_t0", None)
            result["duration"] = round((time.monotonic() - t0) * 1000) if t0 else 0
            if t0:  # an attempt that never started wrote no log
                self.script_logs.write(result, status)
        self.changes.changed(result)
