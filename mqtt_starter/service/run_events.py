"""Publishing the runs the monitor found changed (DESIGN.md section 7), in the order that keeps
the broker's memory right: the status event, for a failed or aborted run its event with the
reason (the script log's tail, else the run's error details), then the retained task state.
The state goes last: it is what a restarted or succeeding instance reads to know what was
published, so a crash in between repeats an event rather than losing one.

One run never stops the rest: a failure while publishing a run is logged with the run, and the
others go on. A failed run's log that is not written yet is asked for again in the background
(0.5 s, then 3 times 2 s apart, as Butler does) while the monitor goes on; that task's failure
event and state wait for it (a task's publications keep their order), and carry the run's
details when the log never comes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from loguru import logger

from mqtt_starter.core.alerts import alert_kind
from mqtt_starter.core.codec import encode_json, encode_status_event
from mqtt_starter.core.errors import LogNotReady, MqttLinkError, QrsError
from mqtt_starter.core.model import Execution, Selector, SelectorKind, TaskRef
from mqtt_starter.core.monitoring import (
    EVENT_KINDS,
    STARTED_BY_OTHER,
    STARTED_BY_US,
    KnownRun,
    RunLedger,
    event_json,
    parse_iso,
    run_outcome,
    state_json,
)
from mqtt_starter.core.policy import AllowList
from mqtt_starter.ops.metrics import Metrics
from mqtt_starter.service.parts import Parts
from mqtt_starter.sites.base import contained_log_tail

Spawn = Callable[[Coroutine[Any, Any, None], str], object]


class RetainingPublisher(Protocol):
    """Where the monitor's messages go; task states are retained."""

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None: ...


def monitor_scope(parts: Parts) -> AllowList | None:
    """The tasks the monitor watches (None: all)."""
    scope = parts.settings.monitor.scope
    if scope is None:
        return None
    return AllowList.build(
        scope.task_ids, scope.tags, [(cp.name, cp.value) for cp in scope.custom_properties]
    )


async def tasks_by_id(parts: Parts, ids: set[str]) -> dict[str, TaskRef]:
    """The tasks of `ids` that exist, read in as few queries as the site allows."""
    if not ids:
        return {}
    found = await parts.backend.find_tasks([Selector(SelectorKind.ID, i) for i in sorted(ids)])
    return {t.id: t for t in found if t.id in ids}


class RunPublisher:
    """Publishes each changed run once, a task's publications in order."""

    def __init__(
        self,
        publisher: RetainingPublisher,
        ledger: RunLedger,
        spawn: Spawn,
        log_retry_s: Sequence[float],
        on_task: Callable[[TaskRef], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """`metrics`: gets each run's state and end, for the per-task series. `on_end`, when
        set: told of each run that ended once it is published (the chains)."""
        self._metrics = metrics
        self.on_end: Callable[[Execution, TaskRef], None] | None = None
        # Told of each run that ended failed, aborted or succeeded, with its event (the alerts).
        self.on_alert: Callable[[str, TaskRef, dict[str, Any]], None] | None = None
        self._publisher = publisher
        self.ledger = ledger
        self._spawn = spawn
        self._log_retry_s = tuple(log_retry_s)
        self._on_task = on_task
        # Per task, the last publication still waiting (for its log): the task's later
        # publications run after it, so that its events and its state keep their order.
        self._lanes: dict[str, asyncio.Future[None]] = {}

    async def publish_changes(self, parts: Parts, changes: Sequence[Execution]) -> bool:
        """Publish each change; False when the broker link broke off (the rest waits)."""
        scope = monitor_scope(parts)
        wanted = {c.task_id for c in changes}
        if scope is not None and scope.task_ids and not (scope.tags or scope.custom_properties):
            wanted &= scope.task_ids  # no need to read tasks that cannot be in scope
        tasks = await tasks_by_id(parts, wanted)
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

    async def _publish(self, parts: Parts, change: Execution, task: TaskRef) -> None:
        """The status event, then for a failed or aborted run its event, then the state."""
        ours, request_id = parts.tracker.claims.claimed(change.execution_id)
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
        ours, request_id = parts.tracker.claims.claimed(change.execution_id)
        started_by = STARTED_BY_US if ours else STARTED_BY_OTHER
        kind = EVENT_KINDS.get(change.status)
        alert = alert_kind(change.status)
        event = (
            event_json(change, task, started_by=started_by, request_id=request_id, reason=reason)
            if kind is not None or (alert is not None and self.on_alert is not None)
            else {}
        )
        if kind is not None:
            await self._publisher.publish(f"{base}/event/task/{kind}", encode_json(event))
            logger.info(
                "monitor: task {} ({}) {}: {}",
                task.name,
                task.id,
                kind,
                reason.splitlines()[-1] if reason else "no reason given",
            )
        self._count(change, task)
        if parts.settings.monitor.retain_state:
            state = state_json(change, task, started_by)
            await self._publisher.publish(
                f"{base}/state/task/{task.id}", encode_json(state), retain=True
            )
            self.ledger.remember(task.id, KnownRun.from_state(state))
        if self.on_alert is not None and alert is not None:
            self.on_alert(alert, task, event)
        if self.on_end is not None and change.status.terminal:
            self.on_end(change, task)

    def _count(self, change: Execution, task: TaskRef) -> None:
        if self._metrics is None:
            return
        stopped = parse_iso(change.stop_time) if change.stop_time else None
        self._metrics.task_run(
            task.id,
            task.name,
            int(change.status),
            ended=run_outcome(change.status),
            duration_s=change.duration_ms / 1000,
            ended_at=stopped.timestamp() if stopped is not None else None,
        )

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
