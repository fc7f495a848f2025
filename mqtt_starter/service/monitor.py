"""Watches every run of the tasks in scope and publishes it (DESIGN.md section 7).

Each interval, one query asks QRS what changed since the newest change seen (less an overlap);
the ledger (core/monitoring.py) keeps what is news. Publishing each change (status event,
failure event, retained state, in the order that keeps the broker's memory right, one run
never stopping the rest) is run_events.py's; the monitor's cursor always advances.

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
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any

from loguru import logger

from mqtt_starter.core.codec import encode_json
from mqtt_starter.core.errors import MqttLinkError, QrsError
from mqtt_starter.core.model import Execution, TaskRef
from mqtt_starter.core.monitoring import (
    KnownRun,
    RunLedger,
)
from mqtt_starter.mqtt.link import Incoming
from mqtt_starter.ops.metrics import Metrics
from mqtt_starter.service.election import Election, json_object
from mqtt_starter.service.parts import Parts
from mqtt_starter.service.run_events import (
    RetainingPublisher,
    RunPublisher,
    Spawn,
    monitor_scope,
    tasks_by_id,
)
from mqtt_starter.sites import base as backend


class Monitor:
    """Watches every run in scope: one query per interval, what is news published
    (run_events.py), deleted tasks cleared; and which instance monitors (the election)."""

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
        metrics: Metrics | None = None,
    ) -> None:
        """`on_role`: called when this instance starts or stops monitoring; `on_state`: told
        each retained task state the broker hands over; `on_task`: each task read (both for
        the status page); `spawn`: runs background work under a name (the daemon's task
        group); `log_retry_s`: the waits for a log that is not written yet (default
        backend.LOG_RETRY_S)."""
        self._own: set[asyncio.Task[None]] = set()
        self._on_state = on_state
        self._on_task = on_task
        self._parts = parts
        self._publisher = publisher
        self._on_role = on_role
        self._clock = clock
        settings = parts().settings.monitor
        self.ledger = RunLedger(overlap_s=settings.overlap_s, lookback_s=settings.lookback_s)
        self.runs = RunPublisher(
            publisher,
            self.ledger,
            spawn or self._own_spawn,
            backend.LOG_RETRY_S if log_retry_s is None else log_retry_s,
            on_task,
            metrics,
        )
        self._metrics = metrics
        self.election = Election()
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
            complete = await self.runs.publish_changes(parts, changes)
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

    async def _clear_deleted(self, parts: Parts) -> None:
        known = set(self.ledger.known)
        if not known:
            return
        try:
            existing = await tasks_by_id(parts, known)
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
            if self._metrics is not None:
                self._metrics.forget_task(task_id)
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
        marker = self.election.new_marker()
        await self._publisher.publish(f"{parts.base}/sync/{parts.instance}", marker)

    def on_disconnect(self) -> None:
        self.election.lost()
        self.elect()

    async def on_message(self, incoming: Incoming) -> None:
        parts = self._parts()
        base, topic = parts.base, incoming.topic
        name = topic.rsplit("/", 1)[-1]
        if topic.startswith(f"{base}/availability/"):
            self.election.availability(name, incoming.payload)
        elif topic.startswith(f"{base}/info/"):
            self.election.info(name, incoming.payload)
        elif topic.startswith(f"{base}/state/task/"):
            data = json_object(incoming.payload) if incoming.payload else None
            self.ledger.remember(name.lower(), KnownRun.from_state(data) if data else None)
            if self._on_state is not None:
                self._on_state(topic, incoming.payload)
        elif topic.startswith(f"{base}/claim/"):
            claim = json_object(incoming.payload)
            if isinstance(claim, dict) and claim.get("instance") != parts.instance:
                request_id = claim.get("requestId")
                parts.tracker.claims.claim(
                    name, request_id if isinstance(request_id, str) else None
                )
            return  # a claim changes nobody's role
        elif topic == f"{base}/sync/{parts.instance}":
            self.election.marker(incoming.payload)
        self.elect()

    @property
    def synced(self) -> bool:
        return self.election.synced

    @property
    def leading(self) -> bool:
        return self.election.leading

    def elect(self) -> None:
        """Decide who monitors; on a change, say so and let the followers know."""
        parts = self._parts()
        own = parts.instance
        if not self.election.decide(own, parts.settings.monitor.enabled):
            return
        if self.leading:
            logger.info("monitor: this instance ({}) watches every run now", own)
        else:
            logger.info("monitor: this instance ({}) stops watching", own)
        parts.tracker.attach(self)
        if self._on_role is not None:
            self._on_role()
