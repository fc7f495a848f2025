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
import time
from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from loguru import logger

from mqtt_starter.core.codec import reply_status
from mqtt_starter.core.errors import BadPayload, QrsError, TooManyTasks
from mqtt_starter.core.model import (
    ErrorInfo,
    ReloadOptions,
    Reply,
    ReplyStatus,
    Request,
    TaskOutcome,
    TaskResult,
)
from mqtt_starter.core.policy import Debouncer, Decision, decide, request_key
from mqtt_starter.core.qrs_query import MAX_VALUE_LENGTH, too_long
from mqtt_starter.core.resolution import without_lineage
from mqtt_starter.ops.logs import request_log
from mqtt_starter.ops.metrics import Metrics
from mqtt_starter.service.followups import (
    FinishedSink,
    FollowUps,
    Publisher,
    RequestWatcher,
    Spawn,
)
from mqtt_starter.service.memory import Record, RequestMemory
from mqtt_starter.service.parts import Parts
from mqtt_starter.sites.base import resolve_selectors

# A topic or path in the log line is cut here: a client chooses its length.
TOPIC_IN_LOG = 200


@dataclass(frozen=True)
class Inbound:
    """A request as a door hands it in."""

    request: Request
    door: str  # "mqtt" | "http"
    topic: str  # the MQTT topic or the HTTP path, for the log line
    kind: str  # the metrics label: id, tag, cp, name, payload, route, http
    debounce_key: Hashable | None = None
    debounce_s: float = 0.0


def error_reply(request_id: str | None, code: str, message: str) -> Reply:
    return Reply(ReplyStatus.ERROR, request_id=request_id, error=ErrorInfo(code, message))


class Starter:
    """The request service: serves each request, whichever door it came through, and gives it
    its log line, metrics and follow-ups (followups.py); repeats come from its memory
    (memory.py)."""

    def __init__(
        self,
        parts: Callable[[], Parts],
        publisher: Publisher,
        metrics: Metrics,
        spawn: Spawn,
        *,
        clock: Callable[[], float] = time.monotonic,
        watcher: RequestWatcher | None = None,
        log: Callable[[str], None] = request_log,
    ) -> None:
        """`parts`: the current parts (a reload swaps them); `spawn`: runs a follow-up in the
        daemon's task group, under a name; `watcher`: sees each request and its replies;
        `log`: where each request's line goes."""
        self._watcher = watcher
        self._log = log
        self._parts = parts
        self._metrics = metrics
        self._clock = clock
        self._debouncer = Debouncer()
        policy = parts().settings.policy
        self.memory = RequestMemory(policy.dedupe_window_s, policy.dedupe_max_entries, clock)
        self.followups = FollowUps(parts, publisher, metrics, spawn, watcher)

    # -- the door's side ----------------------------------------------------------------------

    async def handle(self, inbound: Inbound, *, on_finished: FinishedSink | None = None) -> Reply:
        """Serve one request; `on_finished` receives the `finished` reply of a `wait`."""
        started = self._clock()
        parts = self._parts()
        policy = parts.settings.policy
        self.memory.configure(policy.dedupe_window_s, policy.dedupe_max_entries)
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
        if reply.error is not None:
            detail = f"{reply.error.code}: {reply.error.message}"
        else:
            counts = Counter(outcome.result for outcome in reply.outcomes)
            detail = " ".join(f"{result}={n}" for result, n in sorted(counts.items()))
        elapsed_ms = (self._clock() - started) * 1000
        if self._watcher is not None:
            self._watcher.request(door, topic, reply, elapsed_ms)
        shown = topic if len(topic) <= TOPIC_IN_LOG else topic[:TOPIC_IN_LOG] + "..."
        self._log(
            f"request {door} {shown} requestId={reply.request_id} -> {reply.status}"
            f"{' (replayed)' if reply.replayed else ''} {detail}"
            f" unmatched={len(reply.unmatched)} in {elapsed_ms:.0f} ms"
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
        self.memory.note(request_id, key, inbound.door, inbound.topic)
        record, repeat = await self.memory.recall_or_serve(
            key, lambda: self._carry_out(self._parts(), request, on_finished)
        )
        if repeat:
            return self.followups.replay(self._parts(), record, request, on_finished)
        return record.reply

    async def _carry_out(
        self, parts: Parts, request: Request, on_finished: FinishedSink | None
    ) -> Record:
        async with parts.in_use():
            reply = await self._start(parts, request)
            # Scheduled while the parts are held: a reload that retired them meanwhile must
            # not close the backend between this request and its follower.
            finished = self.followups.schedule(parts, request, reply, on_finished)
        return Record(reply, finished)

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
            resolution = without_lineage(
                await resolve_selectors(
                    parts.backend,
                    request.selectors,
                    all_task_ids_must_exist=request.all_task_ids_must_exist,
                ),
                request.lineage,
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
        outcomes: list[TaskOutcome]
        if len(decisions) == 1:
            # The common case: one task, started in this task (a gather would make another).
            outcomes = [await self._start_one(parts, decisions[0], request.reload)]
        else:
            outcomes = list(
                await asyncio.gather(
                    *(self._start_one(parts, d, request.reload) for d in decisions)
                )
            )
        for outcome in outcomes:
            if outcome.result is TaskResult.STARTED and outcome.execution_id:
                await parts.tracker.claims.started(outcome.execution_id, request.request_id)
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
            ignored=request.ignored,
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
