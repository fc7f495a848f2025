"""A `wait` that survives a restart: what it follows is kept retained on the broker, under the
instance's own topics (the memory the monitor uses too: no local database).

For each MQTT request that waits and started runs, two kinds of retained record:
- `<base>/wait/<instance>/<key>`: where the finished reply goes (topic, Correlation Data),
  the accepted reply as it was sent, the deadline, and the runs' execution ids;
- `<base>/following/<instance>/<executionId>`: one per run followed.
Both are cleared (an empty retained message) once the finished reply was sent. A daemon that
starts reads its own records (a marker it publishes to itself comes back after them), follows
the runs again to the old deadline, and sends the finished reply; a run whose record is gone
(the memory was deleted) is reported Unknown with the reason: the requester is never left
without a finished reply while its request's record is there. Records are per instance: with
several instances, each resumes only its own.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from loguru import logger

from mqtt_starter.core.codec import encode_json, finished_from_accepted, reply_json
from mqtt_starter.core.model import FollowEnd, Reply, TaskRef, TaskResult
from mqtt_starter.mqtt.link import Incoming
from mqtt_starter.service.parts import Parts

Spawn = Callable[[Coroutine[Any, Any, None], str], object]
LOST = "the daemon restarted, and no memory of this run was left to follow it by"


class Publisher(Protocol):
    """Where the memory's records and the finished replies go: the door's ReplyPublisher,
    seen from here (doors/mqtt.py imports this module, so this one cannot import it)."""

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        correlation_data: bytes | None = None,
    ) -> None: ...


class Resumer(Protocol):
    """Who follows runs again after a restart (the request service's follow-ups)."""

    async def resume(
        self, runs: Sequence[tuple[TaskRef, str]], request_id: str | None, timeout_s: float
    ) -> dict[str, FollowEnd]: ...


class WaitMemory:
    """Writes and clears the records of waits in flight; resumes them after a restart."""

    def __init__(
        self,
        parts: Callable[[], Parts],
        publisher: Publisher,
        resumer: Resumer,
        spawn: Spawn,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._parts = parts
        self._publisher = publisher
        self._resumer = resumer
        self._spawn = spawn
        self._clock = clock
        self._waits: dict[str, bytes] = {}  # key → its record, as retained on the broker
        self._runs: set[str] = set()  # execution ids with a record
        self._marker = ""
        self._own: set[str] = set()  # keys this process wrote (not to be resumed by it)
        self.resumed = False  # this process read its memory once (after its first connect)

    # -- topics ----------------------------------------------------------------------------------

    def _base(self) -> str:
        parts = self._parts()
        return f"{parts.base}/{{}}/{parts.instance}"

    def topics(self) -> list[str]:
        """Subscribed by this instance alone (never as a shared subscription)."""
        base = self._base()
        return [base.format("wait") + "/+", base.format("following") + "/+", self._sync_topic()]

    def _sync_topic(self) -> str:
        parts = self._parts()
        return f"{parts.base}/sync/{parts.instance}/waits"

    def wants(self, topic: str) -> bool:
        base = self._base()
        prefixes = (base.format("wait") + "/", base.format("following") + "/")
        return topic.startswith(prefixes) or topic == self._sync_topic()

    # -- writing ---------------------------------------------------------------------------------

    async def remember(
        self,
        accepted: Reply,
        reply_topic: str,
        correlation_data: bytes | None,
        timeout_s: float,
    ) -> str | None:
        """Keep a wait in flight; its key (None when it started no run)."""
        started = [
            o for o in accepted.outcomes if o.result is TaskResult.STARTED and o.execution_id
        ]
        if not started:
            return None
        parts = self._parts()
        key = uuid.uuid4().hex
        self._own.add(key)
        base = self._base()
        for outcome in started:
            record = {"key": key, "taskId": outcome.task.id, "taskName": outcome.task.name}
            await self._publisher.publish(
                f"{base.format('following')}/{outcome.execution_id}",
                encode_json({**record, "executionId": outcome.execution_id}),
                retain=True,
            )
        wait = {
            "replyTo": reply_topic,
            "correlationData": base64.b64encode(correlation_data).decode()
            if correlation_data is not None
            else None,
            "accepted": reply_json(accepted, parts.instance),
            "deadline": self._clock() + timeout_s,
            "runs": [o.execution_id for o in started],
        }
        await self._publisher.publish(
            f"{base.format('wait')}/{key}", encode_json(wait), retain=True
        )
        return key

    async def forget(self, key: str, execution_ids: Sequence[str]) -> None:
        """The finished reply was sent: the records go."""
        base = self._base()
        for execution_id in execution_ids:
            await self._publisher.publish(
                f"{base.format('following')}/{execution_id}", b"", retain=True
            )
        await self._publisher.publish(f"{base.format('wait')}/{key}", b"", retain=True)
        self._own.discard(key)

    # -- reading, after a restart ------------------------------------------------------------------

    async def on_connect(self) -> None:
        """Until this process has read its memory: ask for the marker that comes back after
        the retained records."""
        if self.resumed:
            return
        self._marker = uuid.uuid4().hex
        await self._publisher.publish(self._sync_topic(), self._marker.encode())

    def on_message(self, incoming: Incoming) -> None:
        if self.resumed:
            return  # this process's own records, coming back: nothing to resume
        name = incoming.topic.rsplit("/", 1)[-1]
        base = self._base()
        if incoming.topic.startswith(base.format("wait") + "/"):
            if incoming.payload:
                self._waits[name] = incoming.payload
            else:
                self._waits.pop(name, None)
        elif incoming.topic.startswith(base.format("following") + "/"):
            if incoming.payload:
                self._runs.add(name.lower())
            else:
                self._runs.discard(name.lower())
        elif incoming.payload == self._marker.encode():
            self.resumed = True
            waits, self._waits = self._waits, {}
            runs, self._runs = self._runs, set()
            for key, record in waits.items():
                if key not in self._own:
                    self._spawn(self._resume(key, record, runs), f"resume-wait-{key}")

    async def _resume(self, key: str, payload: bytes, runs: set[str]) -> None:
        try:
            record = json.loads(payload)
            accepted: Mapping[str, Any] = record["accepted"]
            reply_topic = str(record["replyTo"])
            correlation = record.get("correlationData")
            deadline = float(record["deadline"])
            execution_ids = [str(e) for e in record["runs"]]
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("a kept wait ({}) cannot be read, and is dropped: {}", key, exc)
            await self.forget(key, [])
            return
        request_id = accepted.get("requestId")
        follow = [
            (TaskRef(id=str(t["taskId"]), name=str(t.get("taskName", ""))), str(t["executionId"]))
            for t in accepted.get("tasks", ())
            if isinstance(t, Mapping)
            and str(t.get("executionId")) in execution_ids
            and str(t.get("executionId")).lower() in runs
        ]
        logger.info(
            "resuming the wait of requestId={}: {} run(s) to follow, {} without memory",
            request_id,
            len(follow),
            len(execution_ids) - len(follow),
        )
        ends: dict[str, FollowEnd] = {
            e: FollowEnd(None, lost=LOST) for e in execution_ids if e.lower() not in runs
        }
        ends.update(
            await self._resumer.resume(
                follow,
                request_id if isinstance(request_id, str) else None,
                max(0.0, deadline - self._clock()),
            )
        )
        finished = finished_from_accepted(accepted, ends)
        await self._publisher.publish(
            reply_topic,
            encode_json(finished),
            correlation_data=base64.b64decode(correlation)
            if isinstance(correlation, str)
            else None,
        )
        await self.forget(key, execution_ids)
