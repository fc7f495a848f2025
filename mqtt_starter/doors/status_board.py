"""What the status page shows, kept in memory and told to every open page as it changes.

The board is fed by the daemon's own output: each request's reply (both doors, through the
request service), the status events, task states and failure events the daemon publishes, the
task states the broker hands the monitor, and the instance's connection state. It keeps:
- the last `REQUESTS_KEPT` requests (a ring), each with its reply, updated by its finished
  reply;
- the runs in progress (bounded), removed at their final state;
- with the monitor on, each task's last state and its last failure's reason (bounded).
Pages get a snapshot, then the changes as numbered events from a ring of `EVENTS_KEPT`; a page
that falls further behind gets a new snapshot. So memory does not grow with the pages open or
with time: one ring, and a cursor per page.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from mqtt_starter.core.codec import reply_json
from mqtt_starter.core.model import Reply

REQUESTS_KEPT = 200
EVENTS_KEPT = 2000
RUNS_KEPT = 1000
TASKS_KEPT = 20_000
TERMINAL_CODES = {6, 7, 8, 9, 11, 12}


def _iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _now_iso() -> str:
    return _iso(time.time())


class StatusBoard:
    """What the status page shows, bounded, with changes encoded once for every page."""

    def __init__(self, base: str, instance: dict[str, Any]) -> None:
        self.base = base
        self.instance = dict(instance)
        self.requests: deque[dict[str, Any]] = deque(maxlen=REQUESTS_KEPT)
        self.runs: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.tasks: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._tags: OrderedDict[str, list[str]] = OrderedDict()  # task id → tags, as last read
        self.seq = 0
        # (seq, the change as a Server-Sent Events frame): encoded once for every page.
        self._events: deque[tuple[int, bytes]] = deque(maxlen=EVENTS_KEPT)
        self._changed = asyncio.Event()
        self._request_seq = 0
        self.pages = 0  # pages connected now
        # The last snapshot frame and the last batch of change frames, shared by every page
        # that asks for the same: pages that open or wake together cost one encoding.
        self._snapshot: tuple[int, bytes] | None = None
        self._batch: tuple[int, int, bytes] | None = None

    # -- feeding ---------------------------------------------------------------------------------

    def set_instance(self, **fields: Any) -> None:
        changed = {k: v for k, v in fields.items() if self.instance.get(k) != v}
        if changed:
            self.instance.update(changed)
            self._emit("instance", self.instance)

    def request(self, door: str, topic: str, reply: Reply, duration_ms: float) -> None:
        """A request's reply. Kept as it is: the page's JSON of it is built only when a page
        reads it (most of the time no page is open, and the door encodes the reply anyway)."""
        self._request_seq += 1
        entry = {
            "id": self._request_seq,
            "time": time.time(),
            "door": door,
            "topic": topic,
            "requestId": reply.request_id,
            "status": reply.status,  # a StrEnum: the page gets its value
            "stage": reply.stage,
            "durationMs": round(duration_ms, 1),
            "replayed": reply.replayed,
            "reply": reply,
        }
        self.requests.append(entry)
        if self.pages:
            self._emit("request", self._shown(entry))
        else:
            self._emit_nothing()

    def _shown(self, entry: dict[str, Any]) -> dict[str, Any]:
        """The entry as pages see it: its reply as JSON, its time as text (built once)."""
        if isinstance(entry["reply"], Reply):
            entry["reply"] = reply_json(entry["reply"], str(self.instance.get("instance", "")))
            entry["time"] = _iso(entry["time"])
        return entry

    def finished(self, reply: Reply) -> None:
        """A `finished` reply: it completes the entry of its accepted reply."""
        executions = {o.execution_id for o in reply.outcomes if o.execution_id}
        for entry in reversed(self.requests):
            if entry["requestId"] != reply.request_id or entry["stage"] != "accepted":
                continue
            tasks = self._shown(entry)["reply"].get("tasks", [])
            if executions <= {t.get("executionId") for t in tasks}:
                entry["stage"] = "finished"
                entry["status"] = reply.status.value
                entry["reply"] = reply_json(reply, str(self.instance.get("instance", "")))
                self._emit("request", entry)
                return

    def published(self, topic: str, payload: bytes) -> None:
        """Something the daemon published (or the monitor was handed): take what is shown."""
        base = self.base
        if topic.startswith(f"{base}/status/task/"):
            self._status(_json(payload))
        elif topic.startswith(f"{base}/state/task/"):
            self._state(topic.rsplit("/", 1)[1], _json(payload))
        elif topic.startswith(f"{base}/event/task/"):
            self._failure(_json(payload))

    def task_tags(self, task_id: str, tags: Sequence[str]) -> None:
        """The monitor read the task: its tags, for the page's filter."""
        self._tags[task_id] = list(tags)
        self._tags.move_to_end(task_id)
        while len(self._tags) > TASKS_KEPT:
            self._tags.popitem(last=False)
        task = self.tasks.get(task_id)
        if task is not None and task.get("tags") != list(tags):
            task["tags"] = list(tags)
            self._emit("task", task)

    def _status(self, event: Any) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("executionId"), str):
            return
        execution_id = event["executionId"]
        if event.get("stateCode") in TERMINAL_CODES:
            if self.runs.pop(execution_id, None) is not None:
                self._emit("run-ended", {"executionId": execution_id})
            return
        run = self.runs.get(execution_id) or {"since": _now_iso()}
        run.update(
            {
                k: event.get(k)
                for k in (
                    "executionId",
                    "taskId",
                    "taskName",
                    "state",
                    "stateCode",
                    "startTime",
                    "startedBy",
                    "requestId",
                )
            }
        )
        self.runs[execution_id] = run
        self.runs.move_to_end(execution_id)
        while len(self.runs) > RUNS_KEPT:
            self.runs.popitem(last=False)
        self._emit("run", run)

    def _state(self, task_id: str, state: Any) -> None:
        if not isinstance(state, dict):
            if self.tasks.pop(task_id, None) is not None:
                self._emit("task-gone", {"taskId": task_id})
            return
        task = self.tasks.get(task_id, {})
        failed = state.get("stateCode") in (8, 11) or state.get("state") == "Aborted"
        same_run = task.get("executionId") == state.get("executionId")
        task = {
            **state,
            "tags": self._tags.get(task_id, task.get("tags", [])),
            "reason": task.get("reason") if failed and same_run else None,
        }
        self._keep_task(task_id, task)

    def _failure(self, event: Any) -> None:
        if not isinstance(event, dict) or not isinstance(event.get("taskId"), str):
            return
        task_id = event["taskId"]
        task = self.tasks.get(task_id, {"taskId": task_id, "taskName": event.get("taskName")})
        task = {**task, "tags": event.get("tags") or task.get("tags", []),
                "reason": event.get("reason"), "executionId": event.get("executionId"),
                "state": event.get("state"), "stateCode": event.get("stateCode")}  # fmt: skip
        self._keep_task(task_id, task)

    def _keep_task(self, task_id: str, task: dict[str, Any]) -> None:
        self.tasks[task_id] = task
        self.tasks.move_to_end(task_id)
        while len(self.tasks) > TASKS_KEPT:
            self.tasks.popitem(last=False)
        self._emit("task", task)

    # -- telling the pages -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "serverTime": _now_iso(),
            "instance": self.instance,
            "requests": [self._shown(entry) for entry in self.requests],
            "runs": list(self.runs.values()),
            "tasks": list(self.tasks.values()),
        }

    def _emit_nothing(self) -> None:
        """A change nobody is told of: a page that opens starts from a snapshot anyway."""
        self.seq += 1
        self._events.clear()

    def _emit(self, kind: str, data: Any) -> None:
        if not self.pages:
            self._emit_nothing()
            return
        self.seq += 1
        change = json.dumps({"kind": kind, "data": data}, ensure_ascii=False)
        self._events.append((self.seq, sse_frame("change", change)))
        self._changed.set()
        self._changed = asyncio.Event()

    def wake_pages(self) -> None:
        """Wake every page's stream at once (the endpoint is closing)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def snapshot_frame(self) -> tuple[int, bytes]:
        """(seq, the snapshot as a Server-Sent Events frame)."""
        if self._snapshot is None or self._snapshot[0] != self.seq:
            data = json.dumps(self.snapshot(), ensure_ascii=False)
            self._snapshot = (self.seq, sse_frame("snapshot", data))
        return self._snapshot

    async def after(self, seq: int, timeout: float) -> tuple[int, bytes] | None:
        """(the newest seq, the frames of the changes after `seq`), waiting up to `timeout`
        for one (b"" when none came); None when the page fell behind the ring (it needs a
        new snapshot)."""
        if seq == self.seq:
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)
        newest = self.seq
        if newest == seq:
            return seq, b""
        if not self._events or self._events[0][0] > seq + 1:
            return None
        if self._batch is None or self._batch[:2] != (seq, newest):
            frames = b"".join(frame for s, frame in self._events if s > seq)
            self._batch = (seq, newest, frames)
        return newest, self._batch[2]


def sse_frame(event: str, data: str) -> bytes:
    # JSON has no raw line breaks, so one `data:` line carries it whole.
    return f"event: {event}\ndata: {data}\n\n".encode()


def _json(payload: bytes) -> Any:
    if not payload:
        return None
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
