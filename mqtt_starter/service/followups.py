"""Following what a request started: status events for each run, and the `finished` reply of
a `wait`, at the runs' ends (or their deadline, or as Unknown: follow.py says how).

Each follow-up runs in the daemon's task group and holds the parts it started with, so that a
reload never closes the backend under it. A repeat of a request that waits gets the first
one's finished reply, `replayed`. Runs a previous life of the daemon started are followed the
same way (`resume`, for a `wait` kept across a restart).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol

from loguru import logger

from mqtt_starter.core.codec import encode_status_event, reply_status
from mqtt_starter.core.errors import MqttLinkError
from mqtt_starter.core.model import (
    Execution,
    FollowEnd,
    Reply,
    Request,
    TaskOutcome,
    TaskRef,
    TaskResult,
)
from mqtt_starter.ops.metrics import Metrics
from mqtt_starter.service.follow import Tracker
from mqtt_starter.service.memory import Record
from mqtt_starter.service.parts import Parts

FinishedSink = Callable[[Reply], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None], str], object]


class Publisher(Protocol):
    """Where status events go (the broker link)."""

    async def publish(self, topic: str, payload: bytes) -> None: ...


class RequestWatcher(Protocol):
    """Who sees every request and its replies (the status page)."""

    def request(self, door: str, topic: str, reply: Reply, duration_ms: float) -> None: ...

    def finished(self, reply: Reply) -> None: ...


def finished_reply(accepted: Reply, finals: dict[str, TaskOutcome]) -> Reply:
    """The `finished` reply: the accepted one with each started task's end."""
    outcomes = tuple(finals.get(o.task.id, o) for o in accepted.outcomes)
    return Reply(
        reply_status(outcomes, len(accepted.unmatched), finished=True),
        stage="finished",
        request_id=accepted.request_id,
        outcomes=outcomes,
        unmatched=accepted.unmatched,
        replayed=accepted.replayed,
        ignored=accepted.ignored,
    )


class FollowUps:
    """Follows the runs a request started: status events, and the finished reply."""

    def __init__(
        self,
        parts: Callable[[], Parts],
        publisher: Publisher,
        metrics: Metrics,
        spawn: Spawn,
        watcher: RequestWatcher | None = None,
    ) -> None:
        self._parts = parts
        self._publisher = publisher
        self._spawn = spawn
        self._watcher = watcher
        self.following = 0  # executions being followed now
        metrics.follow_executions(lambda: self.following)

    def replay(
        self, parts: Parts, known: Record, request: Request, on_finished: FinishedSink | None
    ) -> Reply:
        """The answer to a repeat: the first one's reply, `replayed`; with `wait`, its
        finished reply too, once the first one's runs have ended."""
        if request.wait and on_finished is not None and known.reply.error is None:
            if known.finished is None:
                # The first request did not follow its runs: follow them now, once.
                known.finished = self.schedule(parts, request, known.reply, None)
            assert known.finished is not None
            self._spawn(
                self._deliver_replayed(known.finished, on_finished),
                f"replay-finished-{request.request_id}",
            )
        return dataclasses.replace(known.reply, replayed=True)

    @staticmethod
    async def _deliver_replayed(finished: asyncio.Future[Reply], sink: FinishedSink) -> None:
        try:
            reply = await asyncio.shield(finished)
        except asyncio.CancelledError:
            if not finished.cancelled():
                raise
            return  # the daemon stopped before the runs ended
        await _deliver(sink, dataclasses.replace(reply, replayed=True))

    async def resume(
        self, runs: Sequence[tuple[TaskRef, str]], request_id: str | None, timeout_s: float
    ) -> dict[str, FollowEnd]:
        """Follow runs a previous life of this daemon started (a `wait` resumed after a
        restart): status events as for any run, and each run's end by execution id."""
        parts = self._parts()
        async with parts.in_use():
            for _, execution_id in runs:
                parts.tracker.claims.claim(execution_id, request_id)
            ends = await asyncio.gather(
                *(
                    self._follow_one(
                        parts,
                        parts.tracker,
                        TaskOutcome(task, (), TaskResult.STARTED, execution_id=execution_id),
                        request_id,
                        timeout_s,
                    )
                    for task, execution_id in runs
                )
            )
        return {o.execution_id: o.final for o in ends if o.execution_id and o.final}

    def schedule(
        self, parts: Parts, request: Request, reply: Reply, on_finished: FinishedSink | None
    ) -> asyncio.Future[Reply] | None:
        """Schedule following the started runs; the future gets the `finished` reply."""
        if reply.error is not None:
            return None
        started = [o for o in reply.outcomes if o.result is TaskResult.STARTED and o.execution_id]
        events = parts.settings.status.publish_task_events and bool(started)
        if not (request.wait or events):
            return None
        finished: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        parts.hold()  # before the task runs: a reload in between must not close the backend
        self._spawn(
            self._follow(parts, request, reply, started, finished, on_finished),
            f"follow-{request.request_id or (started[0].execution_id if started else 'nothing')}",
        )
        return finished

    async def _follow(
        self,
        parts: Parts,
        request: Request,
        accepted: Reply,
        started: list[TaskOutcome],
        finished: asyncio.Future[Reply],
        on_finished: FinishedSink | None,
    ) -> None:
        try:
            timeout_s = request.wait_timeout_s or parts.settings.status.wait_timeout_s
            tracker = parts.tracker
            ends = await asyncio.gather(
                *(
                    self._follow_one(parts, tracker, o, request.request_id, timeout_s)
                    for o in started
                )
            )
            reply = finished_reply(accepted, {o.task.id: o for o in ends})
            finished.set_result(reply)
            if self._watcher is not None:
                self._watcher.finished(reply)
            if request.wait and on_finished is not None:
                await _deliver(on_finished, reply)
        except asyncio.CancelledError:
            finished.cancel()
            raise
        except Exception:
            # A follow-up must never take the daemon's task group down with it.
            logger.exception("following the runs of requestId={} failed", request.request_id)
            if not finished.done():
                finished.cancel()
        finally:
            await parts.release()

    async def _follow_one(
        self,
        parts: Parts,
        tracker: Tracker,
        outcome: TaskOutcome,
        request_id: str | None,
        timeout_s: float,
    ) -> TaskOutcome:
        assert outcome.execution_id is not None
        topic = f"{parts.base}/status/task/{outcome.task.id}"
        publish = parts.settings.status.publish_task_events

        async def on_change(execution: Execution) -> None:
            if not publish or tracker.covered(outcome.task):
                return  # with the monitor on, it publishes the events of the tasks it watches
            try:
                await self._publisher.publish(
                    topic, encode_status_event(execution, outcome.task.name, request_id)
                )
            except MqttLinkError as exc:
                logger.debug("status event for {} not published: {}", outcome.task.id, exc)

        self.following += 1
        try:
            end = await tracker.follow(
                outcome.task, outcome.execution_id, on_change, timeout_s=timeout_s
            )
        finally:
            self.following -= 1
        return dataclasses.replace(outcome, final=end)


async def _deliver(sink: FinishedSink, reply: Reply) -> None:
    try:
        await sink(reply)
    except MqttLinkError as exc:
        logger.warning("the finished reply for requestId={} was lost: {}", reply.request_id, exc)
