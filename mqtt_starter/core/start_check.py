"""What a re-read of a task says about a start that QRS declined or whose answer was lost.

Pure: the QRS client re-reads the task and passes it in. Rules (qrs-api.md section 3):
- the empty GUID does not say why: a running task is `already_running`, a disabled one
  `disabled`, anything else `not_started`, with what was found;
- a lost answer may hide a start: a run that began after the request (the task's last result
  changed) is ours to report; without one the outcome is `unknown`, never a second start.
"""

from __future__ import annotations

from mqtt_starter.core.model import StartResult, TaskRef, TaskResult, TaskStatus
from mqtt_starter.core.policy import RUNNING


def explain_declined(now: TaskRef | None) -> StartResult:
    """The outcome of a start answered with the empty GUID, given the task as re-read."""
    if now is None:
        return StartResult(
            TaskResult.NOT_STARTED, error="QRS did not start the task, and no longer lists it"
        )
    if now.last_status in RUNNING:
        return StartResult(TaskResult.ALREADY_RUNNING)
    if not now.enabled:
        return StartResult(TaskResult.DISABLED)
    return StartResult(
        TaskResult.NOT_STARTED,
        error=(
            f"QRS did not start the task and gave no reason; it is enabled and its last run is"
            f" {now.last_status.qrs_name}: no scheduler available, or the app unavailable?"
        ),
    )


def run_after(before: TaskRef, now: TaskRef | None) -> str | None:
    """The execution result id of a run that began after `before` was read, if any."""
    if now is None or not now.last_result_id or now.last_status is TaskStatus.NEVER_STARTED:
        return None
    return now.last_result_id if now.last_result_id != before.last_result_id else None


def lost_unknown(why: str) -> StartResult:
    return StartResult(
        TaskResult.UNKNOWN,
        error=(
            f"the answer to the start was lost ({why}) and QRS shows no run that began after"
            " it: the task may or may not run"
        ),
    )
