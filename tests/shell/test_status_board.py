"""The status page's board, in-process: what it keeps, that it stays bounded, and what a page
is told."""

from __future__ import annotations

import json

from mqtt_starter.core.model import Reply, ReplyStatus, TaskOutcome, TaskRef, TaskResult
from mqtt_starter.doors.status_board import EVENTS_KEPT, REQUESTS_KEPT, StatusBoard

TASK = TaskRef(id="3a000000-0000-4000-8000-000000000001", name="Reload Sales", tags=("Nightly",))


def board() -> StatusBoard:
    return StatusBoard("butler", {"instance": "i1"})


def status(execution: str, state: str, code: int) -> bytes:
    return json.dumps({"executionId": execution, "taskId": TASK.id, "taskName": TASK.name,
                       "state": state, "stateCode": code, "startedBy": "other",
                       "requestId": None, "startTime": None}).encode()  # fmt: skip


def test_requests_are_a_ring_and_finished_replies_complete_their_entry() -> None:
    b = board()
    started = TaskOutcome(TASK, (), TaskResult.STARTED, execution_id="e1")
    for i in range(REQUESTS_KEPT + 5):
        b.request("mqtt", "butler/start", Reply(ReplyStatus.OK, request_id=f"r{i}"), 1.0)
    assert len(b.requests) == REQUESTS_KEPT
    assert b.requests[0]["requestId"] == "r5"
    b.request("http", "PUT /v4/...", Reply(ReplyStatus.OK, request_id="w", outcomes=(started,)), 2)
    b.finished(Reply(ReplyStatus.ERROR, stage="finished", request_id="w", outcomes=(started,)))
    last = b.requests[-1]
    assert (last["door"], last["stage"], last["status"]) == ("http", "finished", "error")


def test_runs_in_progress_end_at_their_final_state() -> None:
    b = board()
    b.published(f"butler/status/task/{TASK.id}", status("e1", "Started", 2))
    assert [r["state"] for r in b.runs.values()] == ["Started"]
    b.published(f"butler/status/task/{TASK.id}", status("e1", "FinishedFail", 8))
    assert b.runs == {}


def test_a_failed_task_keeps_its_reason_and_tags() -> None:
    b = board()
    b.task_tags(TASK.id, ["Nightly"])
    event = {"taskId": TASK.id, "taskName": TASK.name, "executionId": "e1", "reason": "boom",
             "state": "FinishedFail", "stateCode": 8, "tags": ["Nightly"]}  # fmt: skip
    b.published("butler/event/task/failed", json.dumps(event).encode())
    state = {"taskId": TASK.id, "taskName": TASK.name, "executionId": "e1",
             "state": "FinishedFail", "stateCode": 8}  # fmt: skip
    b.published(f"butler/state/task/{TASK.id}", json.dumps(state).encode())
    assert (b.tasks[TASK.id]["reason"], b.tasks[TASK.id]["tags"]) == ("boom", ["Nightly"])
    b.published(f"butler/state/task/{TASK.id}", b"")  # deleted
    assert b.tasks == {}


async def test_a_page_gets_changes_or_a_new_snapshot_when_it_fell_behind() -> None:
    b = board()
    b.pages = 1
    seq, frame = b.snapshot_frame()
    assert frame.startswith(b"event: snapshot\ndata: ")
    b.set_instance(brokerConnected=True)
    changes = await b.after(seq, timeout=1)
    assert changes is not None and changes[0] == seq + 1
    assert changes[1].startswith(b"event: change\ndata: ")
    assert json.loads(changes[1].split(b"data: ", 1)[1])["kind"] == "instance"
    for i in range(EVENTS_KEPT + 10):
        b.published(f"butler/status/task/{TASK.id}", status(f"e{i}", "Started", 2))
    assert len(b._events) == EVENTS_KEPT
    assert await b.after(seq, timeout=1) is None  # behind the ring: a new snapshot
    assert await b.after(b.seq, timeout=0.01) == (b.seq, b"")  # nothing new: a heartbeat


def test_nothing_is_kept_while_no_page_is_open() -> None:
    b = board()
    b.set_instance(brokerConnected=True)
    assert (b.seq, len(b._events)) == (1, 0)
