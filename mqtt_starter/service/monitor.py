"""Watches every run of the tasks in scope and publishes it (DESIGN.md section 7).

Each interval, one query asks QRS what changed since the newest change seen (less an overlap);
the ledger (core/monitoring.py) keeps what is news. For each change: the status event, for a
failed or aborted run its event with the reason (the script log's tail, else the run's error
details), then the retained task state. The state goes last: it is what a restarted or
succeeding instance reads to know what was published, so a crash in between repeats an event
rather than losing one.

One run never stops the rest: a failure while publishing a run is logged with the run, and
the monitor goes on with the others and its cursor advances. A failed run's log that is not
written yet is asked for again in the background (0.5 s, then 3 times 2 s apart, as Butler
does) while the monitor goes on; that task's failure event and state wait for it (a task's
publications keep their order), and carry the run's details when the log never comes.

The tasks of the changed runs are read once per interval, in one filtered query. Tasks whose
state is retained are checked for deletion every `deleted_check_s`, and a deleted task's state
is cleared. The query also serves the followers of runs this daemon started (follow.py).

Several instances: each monitor-enabled instance reads the others' retained availability and
info; the online one whose client_id sorts first monitors. Before an instance takes part it
waits until the broker has delivered the retained messages (a marker it publishes to itself
comes back after them).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from loguru import logger

from mqtt_starter.core.codec import encode_json, encode_status_event
from mqtt_starter.core.errors import LogNotReady, MqttLinkError, QrsError
from mqtt_starter.core.model import Execution, Selector, SelectorKind, TaskRef
from mqtt_starter.core.monitoring import (
    EVENT_KINDS,
    STARTED_BY_OTHER,
    STARTED_BY_US,
    KnownRun,
    Peer,
    RunLedger,
    event_json,
    leader,
    state_json,
)
from mqtt_starter.core.policy import AllowList
from mqtt_starter.mqtt.link import Incoming
from mqtt_starter.service.parts import Parts
from mqtt_starter.sites import base as backend
from mqtt_starter.sites.base import contained_log_tail


class RetainingPublisher(Protocol):
    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None: ...


Spawn = Callable[[Coroutine[Any, Any, None], str], object]


def monitor_scope(parts: Parts) -> AllowList | None:
    scope = parts.settings.monitor.scope
    if scope is None:
        return None
    return AllowList.build(
        scope.task_ids, scope.tags, [(cp.name, cp.value) for cp in scope.custom_properties]
    )


class Monitor:
    def __init__(
        self,
        parts: Callable[[], Parts],
        publisher: RetainingPublisher,
        *,
        on_role: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_state: Callable[[str, bytes], None] | None = None,
        on_task: Callable[[TaskRef], None] | None = None,
        spawn: Spawn | None = None,
        log_retry_s: Sequence[float] | None = None,
    ) -> None:
        """`on_role`: called when this instance starts or stops monitoring; `on_state`: told
        each retained task state the broker hands over; `on_task`: each task read (both for
        the status page); `spawn`: runs background work under a name (the daemon's task
        group); `log_retry_s`: the waits for a log that is not written yet (default
        backend.LOG_RETRY_S)."""
        self._spawn = spawn or self._own_spawn
        self._own: set[asyncio.Task[None]] = set()
        self._log_retry_s = tuple(backend.LOG_RETRY_S if log_retry_s is None else log_retry_s)
        # Per task, the last publication still waiting (for its log): the task's later
        # publications run after it, so that its events and its state keep their order.
        self._lanes: dict[str, asyncio.Future[None]] = {}
        self._on_state = on_state
        self._on_task = on_task
        self._parts = parts
        self._publisher = publisher
        self._on_role = on_role
        self._clock = clock
        settings = parts().settings.monitor
        self.ledger = RunLedger(overlap_s=settings.overlap_s, lookback_s=settings.lookback_s)
        self.peers: dict[str, Peer] = {}
        self.synced = False
        self.leading = False
        self._marker = ""
        self._next_deleted_check = 0.0
        # The backend whose date reading was measured (qrs-api.md section 6), and when to try
        # again while there was no run to measure against.
        self._calibrated: object | None = None
        self._next_calibration = 0.0

    # -- ChangeSource (follow.py) --------------------------------------------------------------

    @property
    def interval_s(self) -> float:
        return self._parts().settings.monitor.interval_s

    @property
    def active(self) -> bool:
        return self.leading

    def covers(self, task: TaskRef) -> bool:
        """Whether some instance (this one or the one that leads) publishes the task's runs:
        once this one has joined, someone always leads."""
        parts = self._parts()
        if not (parts.settings.monitor.enabled and self.synced):
            return False
        scope = monitor_scope(parts)
        return scope is None or scope.allows(task)

    async def announce(self, execution_id: str, request_id: str | None) -> None:
        """Tell the monitoring instance that this one started a run (for its `startedBy` and
        `requestId`), when another instance monitors."""
        parts = self._parts()
        if not (parts.settings.monitor.enabled and self.synced) or self.leading:
            return
        payload = encode_json({"requestId": request_id, "instance": parts.instance})
        try:
            await self._publisher.publish(f"{parts.base}/claim/{execution_id}", payload)
        except MqttLinkError as exc:
            logger.debug("monitor: the claim of {} was not published: {}", execution_id, exc)

    async def poll(self) -> list[Execution]:
        parts = self._parts()
        await self._calibrate(parts)
        since = self.ledger.since(datetime.now(UTC))
        results = await parts.backend.changed_executions(since)
        changes = self.ledger.changes(results)
        complete = True
        if changes:
            complete = await self._publish_changes(parts, changes)
        if complete:
            self.ledger.taken_in(results)
        if self._clock() >= self._next_deleted_check:
            self._next_deleted_check = self._clock() + parts.settings.monitor.deleted_check_s
            await self._clear_deleted(parts)
        return results

    async def _calibrate(self, parts: Parts) -> None:
        """Before the first query of a backend, and again every `deleted_check_s` until it
        could be measured: how the site reads the dates of the query."""
        backend = parts.backend
        if self._calibrated is backend or self._clock() < self._next_calibration:
            return
        self._next_calibration = self._clock() + parts.settings.monitor.deleted_check_s
        try:
            measured = await backend.calibrate_dates()
        except QrsError as exc:
            logger.warning("monitor: how the site reads dates could not be measured: {}", exc)
            return
        if measured:
            self._calibrated = backend
        if self._on_role is not None:
            self._on_role()  # the info says what was found

    def _own_spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> object:
        task = asyncio.create_task(coroutine, name=name)
        self._own.add(task)
        task.add_done_callback(self._own.discard)
        return task

    async def close(self) -> None:
        """Cancel what waits in the background (publications waiting for a log)."""
        for task in list(self._own):
            task.cancel()
        await asyncio.gather(*self._own, return_exceptions=True)

    # -- publishing ----------------------------------------------------------------------------

    async def _publish_changes(self, parts: Parts, changes: Sequence[Execution]) -> bool:
        """Publish each change; False when the broker link broke off (the rest waits)."""
        scope = monitor_scope(parts)
        wanted = {c.task_id for c in changes}
        if scope is not None and scope.task_ids and not (scope.tags or scope.custom_properties):
            wanted &= scope.task_ids  # no need to read tasks that cannot be in scope
        tasks = await self._tasks(parts, wanted)
        for change in changes:
            task = tasks.get(change.task_id)
            if task is None or (scope is not None and not scope.allows(task)):
                self.ledger.mark(change)  # out of scope (or deleted): nothing to publish
                continue
            if self._on_task is not None:
                self._on_task(task)
            self.ledger.mark(change)
            if task.id in self._lanes:
                # An earlier run of the task waits for its log: this one goes after it.
                self._queue(parts, task, change, self._lanes[task.id])
                continue
            try:
                await self._publish(parts, change, task)
            except MqttLinkError as exc:
                logger.warning("monitor: publishing the run of {} failed: {}", task.id, exc)
                self.ledger.reopen(change)
                return False
            except Exception:
                # One run must not stop the others: logged with the run, and passed over.
                logger.exception(
                    "monitor: publishing execution {} of task {} ({}) failed",
                    change.execution_id,
                    task.name,
                    task.id,
                )
        return True

    def _queue(
        self,
        parts: Parts,
        task: TaskRef,
        change: Execution,
        before: Awaitable[None] | None,
        *,
        reason_first: bool = False,
    ) -> None:
        """Publish `change` in the background, after `before` (the task's lane)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lanes[task.id] = done

        async def publish() -> None:
            try:
                if before is not None:
                    await before
                if reason_first:
                    await self._publish_end(
                        parts, change, task, await self._late_reason(parts, task, change)
                    )
                else:
                    await self._publish(parts, change, task)
            except MqttLinkError as exc:
                logger.warning("monitor: publishing the run of {} failed: {}", task.id, exc)
                self.ledger.reopen(change)
            except Exception:
                logger.exception(
                    "monitor: publishing execution {} of task {} ({}) failed",
                    change.execution_id,
                    task.name,
                    task.id,
                )
            finally:
                done.set_result(None)
                if self._lanes.get(task.id) is done:
                    del self._lanes[task.id]

        self._spawn(publish(), f"monitor-publish-{change.execution_id}")

    @staticmethod
    async def _tasks(parts: Parts, ids: set[str]) -> dict[str, TaskRef]:
        if not ids:
            return {}
        found = await parts.backend.find_tasks([Selector(SelectorKind.ID, i) for i in sorted(ids)])
        return {t.id: t for t in found if t.id in ids}

    async def _publish(self, parts: Parts, change: Execution, task: TaskRef) -> None:
        """The status event, then for a failed or aborted run its event, then the state."""
        ours, request_id = parts.tracker.claimed(change.execution_id)
        started_by = STARTED_BY_US if ours else STARTED_BY_OTHER
        await self._publisher.publish(
            f"{parts.base}/status/task/{task.id}",
            encode_status_event(change, task.name, request_id, started_by=started_by),
        )
        reason = ""
        if change.status in EVENT_KINDS:
            try:
                reason = await self._reason(parts, task, change)
            except LogNotReady:
                # Not written yet: waited for in the background; the monitor goes on.
                self._queue(parts, task, change, None, reason_first=True)
                return
        await self._publish_end(parts, change, task, reason)

    async def _publish_end(
        self, parts: Parts, change: Execution, task: TaskRef, reason: str
    ) -> None:
        """A failed or aborted run's event (with `reason`), then the retained state."""
        base = parts.base
        ours, request_id = parts.tracker.claimed(change.execution_id)
        started_by = STARTED_BY_US if ours else STARTED_BY_OTHER
        kind = EVENT_KINDS.get(change.status)
        if kind is not None:
            await self._publisher.publish(
                f"{base}/event/task/{kind}",
                encode_json(
                    event_json(
                        change, task, started_by=started_by, request_id=request_id, reason=reason
                    )
                ),
            )
            logger.info(
                "monitor: task {} ({}) {}: {}",
                task.name,
                task.id,
                kind,
                reason.splitlines()[-1] if reason else "no reason given",
            )
        if parts.settings.monitor.retain_state:
            state = state_json(change, task, started_by)
            await self._publisher.publish(
                f"{base}/state/task/{task.id}", encode_json(state), retain=True
            )
            self.ledger.remember(task.id, KnownRun.from_state(state))

    @staticmethod
    def _has_log(parts: Parts, change: Execution) -> bool:
        """Whether the run may have a log to read: it started (a log is written from then)."""
        return parts.settings.monitor.log_tail_lines > 0 and (
            change.script_log or change.start_time is not None
        )

    async def _reason(self, parts: Parts, task: TaskRef, change: Execution) -> str:
        """The log's tail at once, else the run's details; LogNotReady when the log is not
        written yet (the caller waits for it in the background)."""
        if self._has_log(parts, change):
            lines = parts.settings.monitor.log_tail_lines
            try:
                tail = await parts.backend.script_log_tail(task, change, lines)
            except LogNotReady:
                raise
            except QrsError as exc:
                logger.warning(
                    "monitor: the script log of execution {} of task {} cannot be read: {}",
                    change.execution_id,
                    task.id,
                    exc,
                )
                tail = None
            except Exception:
                logger.exception(
                    "monitor: reading the script log of execution {} of task {} failed",
                    change.execution_id,
                    task.id,
                )
                tail = None
            if tail:
                return tail
        return change.reason or change.message

    async def _late_reason(self, parts: Parts, task: TaskRef, change: Execution) -> str:
        """The log's tail once it is written (asked again after each of the waits), else the
        run's details."""
        lines = parts.settings.monitor.log_tail_lines
        tail = await contained_log_tail(
            lambda: parts.backend.script_log_tail(task, change, lines),
            self._log_retry_s,
            f"execution {change.execution_id} of task {task.id}",
        )
        return tail or change.reason or change.message

    async def _clear_deleted(self, parts: Parts) -> None:
        known = set(self.ledger.known)
        if not known:
            return
        try:
            existing = await self._tasks(parts, known)
        except QrsError as exc:
            logger.warning("monitor: checking for deleted tasks failed: {}", exc)
            return
        for task_id in sorted(known - set(existing)):
            try:
                await self._publisher.publish(
                    f"{parts.base}/state/task/{task_id}", b"", retain=True
                )
            except MqttLinkError:
                return
            self.ledger.remember(task_id, None)
            logger.info("monitor: task {} no longer exists; its retained state is cleared", task_id)

    # -- the broker's side: peers, retained states, the marker -----------------------------------

    def topics(self, parts: Parts) -> list[str]:
        """What a monitor-enabled instance subscribes to (never as a shared subscription)."""
        base = parts.base
        return [
            f"{base}/availability/+",
            f"{base}/info/+",
            f"{base}/state/task/+",
            f"{base}/claim/+",
            f"{base}/sync/{parts.instance}",
        ]

    def wants(self, topic: str) -> bool:
        base = self._parts().base
        return topic.startswith(
            (
                f"{base}/availability/",
                f"{base}/info/",
                f"{base}/state/task/",
                f"{base}/claim/",
                f"{base}/sync/",
            )
        )

    async def on_connect(self) -> None:
        """After (re)subscribing: ask for the marker that says the retained ones arrived."""
        parts = self._parts()
        self.synced = False
        self._marker = uuid.uuid4().hex
        await self._publisher.publish(f"{parts.base}/sync/{parts.instance}", self._marker.encode())

    def on_disconnect(self) -> None:
        self.synced = False
        self.elect()

    async def on_message(self, incoming: Incoming) -> None:
        parts = self._parts()
        base, topic = parts.base, incoming.topic
        name = topic.rsplit("/", 1)[-1]
        if topic.startswith(f"{base}/availability/"):
            peer = self.peers.get(name, Peer())
            self.peers[name] = Peer(online=incoming.payload == b"online", monitor=peer.monitor)
        elif topic.startswith(f"{base}/info/"):
            monitor = _json_field(incoming.payload, "monitor") is True
            peer = self.peers.get(name, Peer())
            self.peers[name] = Peer(online=peer.online, monitor=monitor)
        elif topic.startswith(f"{base}/state/task/"):
            run = KnownRun.from_state(_json(incoming.payload)) if incoming.payload else None
            self.ledger.remember(name.lower(), run)
            if self._on_state is not None:
                self._on_state(topic, incoming.payload)
        elif topic.startswith(f"{base}/claim/"):
            claim = _json(incoming.payload)
            if isinstance(claim, dict) and claim.get("instance") != parts.instance:
                request_id = claim.get("requestId")
                parts.tracker.claim(name, request_id if isinstance(request_id, str) else None)
            return  # a claim changes nobody's role
        elif topic == f"{base}/sync/{parts.instance}" and incoming.payload == self._marker.encode():
            self.synced = True
        self.elect()

    def elect(self) -> None:
        parts = self._parts()
        own = parts.instance
        leading = (
            parts.settings.monitor.enabled
            and self.synced
            and leader(own, {k: v for k, v in self.peers.items() if k != own}) == own
        )
        if leading == self.leading:
            return
        self.leading = leading
        if leading:
            logger.info("monitor: this instance ({}) watches every run now", own)
        else:
            logger.info("monitor: this instance ({}) stops watching", own)
        parts.tracker.attach(self)
        if self._on_role is not None:
            self._on_role()


def _json(payload: bytes) -> object:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None


def _json_field(payload: bytes, key: str) -> object:
    data = _json(payload)
    return data.get(key) if isinstance(data, dict) else None
