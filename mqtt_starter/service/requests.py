"""The request service: the one use case every door calls.

An `Inbound` (a request, whichever door it came through) → debounce → dedupe → resolve →
policy → start → Reply, plus the request's log line, its metrics, and the follow-up it
schedules (status events, and the `finished` reply of a `wait`). The MQTT door and Butler's
REST endpoint only translate their protocol to an Inbound and the Reply back, so they cannot
drift apart.

Dedupe: a repeat (the same requestId with the same ask: door, topic, selectors, options)
handled within `policy.dedupe_window_s` is answered again from memory with `replayed: true` and
starts nothing; the same requestId with another ask is a new request, served and logged as such
(two devices that both count from 1, a route fed by status events that carry the upstream
requestId); with `wait` it still gets the finished reply, once the
first request's runs have ended. A repeat that arrives while the first is being handled waits
for it; if the first failed, the repeat is served in its own right.
Followers hold the parts they started with, so a reload never cuts them off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from loguru import logger

from mqtt_starter.core.codec import encode_status_event, reply_status
from mqtt_starter.core.errors import BadPayload, MqttLinkError, QrsError, TooManyTasks
from mqtt_starter.core.model import (
    ErrorInfo,
    Execution,
    FollowEnd,
    ReloadOptions,
    Reply,
    ReplyStatus,
    Request,
    TaskOutcome,
    TaskRef,
    TaskResult,
)
from mqtt_starter.core.policy import Debouncer, Decision, ExpiringMemory, decide, request_key
from mqtt_starter.core.qrs_query import MAX_VALUE_LENGTH, too_long
from mqtt_starter.ops.metrics import Metrics
from mqtt_starter.service.follow import Tracker
from mqtt_starter.service.parts import Parts
from mqtt_starter.sites.base import resolve_selectors

# A topic or path in the log line is cut here: a client chooses its length.
TOPIC_IN_LOG = 200
# Error codes of a passing condition: such a refusal is not remembered for the requestId.
PASSING = ("qrs_unavailable", "internal")


@dataclass(frozen=True)
class Inbound:
    """A request as a door hands it in."""

    request: Request
    door: str  # "mqtt" | "http"
    topic: str  # the MQTT topic or the HTTP path, for the log line
    kind: str  # the metrics label: id, tag, cp, name, payload, route, http
    debounce_key: Hashable | None = None
    debounce_s: float = 0.0


FinishedSink = Callable[[Reply], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None], str], object]


class Publisher(Protocol):
    """Where status events go (the broker link)."""

    async def publish(self, topic: str, payload: bytes) -> None: ...


class RequestWatcher(Protocol):
    """Who sees every request and its replies (the status page)."""

    def request(self, door: str, topic: str, reply: Reply, duration_ms: float) -> None: ...

    def finished(self, reply: Reply) -> None: ...


def error_reply(request_id: str | None, code: str, message: str) -> Reply:
    return Reply(ReplyStatus.ERROR, request_id=request_id, error=ErrorInfo(code, message))


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
    )


@dataclass
class _Record:
    """What is remembered of a handled requestId."""

    reply: Reply
    finished: asyncio.Future[Reply] | None = None  # set while or once its runs are followed


class Starter:
    def __init__(
        self,
        parts: Callable[[], Parts],
        publisher: Publisher,
        metrics: Metrics,
        spawn: Spawn,
        *,
        clock: Callable[[], float] = time.monotonic,
        watcher: RequestWatcher | None = None,
    ) -> None:
        """`parts`: the current parts (a reload swaps them); `spawn`: runs a follow-up in the
        daemon's task group, under a name; `watcher`: sees each request and its replies."""
        self._watcher = watcher
        self._parts = parts
        self._publisher = publisher
        self._metrics = metrics
        self._spawn = spawn
        self._clock = clock
        self._debouncer = Debouncer()
        policy = parts().settings.policy
        window_s, capacity = policy.dedupe_window_s, policy.dedupe_max_entries
        self._answered: ExpiringMemory[Hashable, _Record] = ExpiringMemory(window_s, capacity)
        # The ask each requestId came with last: a different one is logged as a new request.
        self._asks: ExpiringMemory[str, Hashable] = ExpiringMemory(window_s, capacity)
        self._pending: dict[Hashable, asyncio.Future[_Record | None]] = {}
        self.following = 0  # executions being followed now
        metrics.follow_executions(lambda: self.following)

    # -- the door's side ----------------------------------------------------------------------

    async def handle(self, inbound: Inbound, *, on_finished: FinishedSink | None = None) -> Reply:
        """Serve one request; `on_finished` receives the `finished` reply of a `wait`."""
        started = self._clock()
        parts = self._parts()
        policy = parts.settings.policy
        self._answered.window_s = self._asks.window_s = policy.dedupe_window_s
        self._answered.capacity = self._asks.capacity = policy.dedupe_max_entries
        try:
            reply = await self._serve(parts, inbound, on_finished)
        except Exception:
            # A bug must not leave the sender without an answer, nor loop: it is answered,
            # logged with its traceback, and the door acknowledges the message as usual.
            logger.exception("request on {} failed", inbound.topic)
            reply = error_reply(
                inbound.request.request_id,
                "internal",
                "internal error; the daemon's log has the details",
            )
        self.account(inbound.door, inbound.topic, inbound.kind, reply, started)
        return reply

    def count_ignored(self, kind: str) -> None:
        self._metrics.triggers.labels(kind, "ignored").inc()

    def account(self, door: str, topic: str, kind: str, reply: Reply, started: float) -> None:
        """The request's metrics and its one log line; doors call it for their refusals."""
        self._metrics.count_reply(kind, reply)
        counts: dict[str, int] = {}
        for outcome in reply.outcomes:
            counts[outcome.result.value] = counts.get(outcome.result.value, 0) + 1
        detail = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        if reply.error is not None:
            detail = f"{reply.error.code}: {reply.error.message}"
        elapsed_ms = (self._clock() - started) * 1000
        if self._watcher is not None:
            self._watcher.request(door, topic, reply, elapsed_ms)
        logger.info(
            "request {} {} requestId={} -> {}{} {} unmatched={} in {:.0f} ms",
            door,
            topic if len(topic) <= TOPIC_IN_LOG else topic[:TOPIC_IN_LOG] + "...",
            reply.request_id,
            reply.status.value,
            " (replayed)" if reply.replayed else "",
            detail,
            len(reply.unmatched),
            elapsed_ms,
        )

    # -- serving --------------------------------------------------------------------------------

    async def _serve(
        self, parts: Parts, inbound: Inbound, on_finished: FinishedSink | None
    ) -> Reply:
        request = inbound.request
        if inbound.debounce_key is not None and not self._debouncer.admit(
            inbound.debounce_key, inbound.debounce_s, self._clock()
        ):
            return Reply(
                ReplyStatus.OK,
                request_id=request.request_id,
                notes=(f"debounced: started less than {inbound.debounce_s}s ago",),
            )
        request_id = request.request_id
        if request_id is None:
            return (await self._carry_out(parts, request, on_finished)).reply
        key = request_key(request, inbound.door, inbound.topic)
        earlier = self._asks.get(request_id, self._clock())
        if earlier is not None and earlier != key:
            logger.info(
                "requestId={} came before with another request ({} {}): served as a new one",
                request_id,
                inbound.door,
                inbound.topic,
            )
        self._asks.put(request_id, key, self._clock())
        while True:
            known = self._answered.get(key, self._clock())
            if known is not None:
                return self._replay(parts, known, request, on_finished)
            first = self._pending.get(key)
            if first is None:
                break
            # The same requestId is being handled: wait for its answer, then look again: it
            # is remembered (a replay), or it failed and this one is served in its own right
            # (or waits for a third that got in first).
            await asyncio.shield(first)
            parts = self._parts()  # a reload may have come while this one waited
        pending = asyncio.get_running_loop().create_future()
        self._pending[key] = pending
        record: _Record | None = None
        try:
            record = await self._carry_out(parts, request, on_finished)
        finally:
            del self._pending[key]
            pending.set_result(record)
        error = record.reply.error
        if error is None or error.code not in PASSING:
            self._answered.put(key, record, self._clock())
        return record.reply

    async def _carry_out(
        self, parts: Parts, request: Request, on_finished: FinishedSink | None
    ) -> _Record:
        async with parts.in_use():
            reply = await self._start(parts, request)
            # Scheduled while the parts are held: a reload that retired them meanwhile must
            # not close the backend between this request and its follower.
            finished = self._follow_up(parts, request, reply, on_finished)
        return _Record(reply, finished)

    async def _start(self, parts: Parts, request: Request) -> Reply:
        limit = parts.settings.policy.max_tasks_per_request
        try:
            long = next((sel for sel in request.selectors if too_long(sel)), None)
            if long is not None:
                raise BadPayload(
                    f"{long.label[:60]}...: a selector value may have at most"
                    f" {MAX_VALUE_LENGTH} characters"
                )
            if len(request.selectors) > limit:
                raise TooManyTasks(f"{len(request.selectors)} selectors; the limit is {limit}")
            if request.reload is not None and parts.backend.site != "cloud":
                raise BadPayload(
                    "partial, weight and variables are options of a Qlik Cloud reload;"
                    " this daemon serves a client-managed Sense site (QRS)"
                )
            resolution = await resolve_selectors(
                parts.backend,
                request.selectors,
                all_task_ids_must_exist=request.all_task_ids_must_exist,
            )
            if len(resolution.tasks) > limit:
                raise TooManyTasks(
                    f"the selectors match {len(resolution.tasks)} tasks; the limit is {limit}"
                )
        except (QrsError, TooManyTasks, BadPayload) as exc:
            return error_reply(request.request_id, exc.code, str(exc))
        policy = parts.settings.policy
        decisions = [
            decide(
                r,
                parts.allow,
                start_running=policy.on_running == "start",
                dry_run=request.dry_run,
            )
            for r in resolution.tasks
        ]
        outcomes = await asyncio.gather(
            *(self._start_one(parts, d, request.reload) for d in decisions)
        )
        for outcome in outcomes:
            if outcome.result is TaskResult.STARTED and outcome.execution_id:
                await parts.tracker.started(outcome.execution_id, request.request_id)
        outcomes += [
            TaskOutcome(
                w.task,
                w.matched_by,
                TaskResult.DENIED,
                error="allTaskIdsMustExist: an id in the request is unknown or invalid",
            )
            for w in resolution.withheld
        ]
        return Reply(
            reply_status(outcomes, len(resolution.unmatched), finished=False),
            request_id=request.request_id,
            outcomes=tuple(outcomes),
            unmatched=resolution.unmatched,
        )

    @staticmethod
    async def _start_one(
        parts: Parts, decision: Decision, options: ReloadOptions | None
    ) -> TaskOutcome:
        task, ways = decision.resolved.task, decision.resolved.matched_by
        if not decision.start:
            assert decision.result is not None
            return TaskOutcome(task, ways, decision.result, error=decision.error)
        started = await parts.backend.start_task(task, options)
        if started.result in (TaskResult.FAILED, TaskResult.UNKNOWN, TaskResult.NOT_STARTED):
            logger.warning(
                "starting task {} ({}): {}: {}", task.id, task.name, started.result, started.error
            )
        return TaskOutcome(
            task,
            ways,
            started.result,
            execution_id=started.execution_id,
            error=started.error,
            waited_ms=started.waited_ms,
        )

    def _replay(
        self, parts: Parts, known: _Record, request: Request, on_finished: FinishedSink | None
    ) -> Reply:
        if request.wait and on_finished is not None and known.reply.error is None:
            if known.finished is None:
                # The first request did not follow its runs: follow them now, once.
                known.finished = self._follow_up(parts, request, known.reply, None)
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

    # -- following ------------------------------------------------------------------------------

    async def resume(
        self, runs: Sequence[tuple[TaskRef, str]], request_id: str | None, timeout_s: float
    ) -> dict[str, FollowEnd]:
        """Follow runs a previous life of this daemon started (a `wait` resumed after a
        restart): status events as for any run, and each run's end by execution id."""
        parts = self._parts()
        async with parts.in_use():
            for _, execution_id in runs:
                parts.tracker.claim(execution_id, request_id)
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

    def _follow_up(
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
