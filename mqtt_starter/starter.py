"""The one use case both front doors call: Request → resolve → policy → start → Reply.

MQTT triggers and Butler's REST endpoint both come through `Starter.handle`, so they cannot
drift apart. A repeated requestId within the dedupe window is answered from memory (a repeat
that arrives while the first is still being handled waits for the first one's reply).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from .codec import reply_status
from .config import PolicySettings
from .errors import BadPayload, QrsError, TooManyTasks
from .model import (
    ErrorInfo,
    Reply,
    ReplyStatus,
    Request,
    TaskOutcome,
    TaskResult,
)
from .policy import AllowList, Decision, ExpiringMemory, decide
from .qrs_client import QrsClient
from .qrs_query import MAX_VALUE_LENGTH, too_long


def allow_list(policy: PolicySettings) -> AllowList | None:
    allow = policy.allow
    if allow is None:
        return None
    return AllowList.build(
        allow.task_ids, allow.tags, [(cp.name, cp.value) for cp in allow.custom_properties]
    )


@dataclass(frozen=True)
class Handled:
    reply: Reply
    replayed: bool = False

    @property
    def started(self) -> list[TaskOutcome]:
        return (
            []
            if self.replayed
            else [
                o for o in self.reply.outcomes if o.result is TaskResult.STARTED and o.execution_id
            ]
        )


def error_reply(request_id: str | None, code: str, message: str) -> Reply:
    return Reply(ReplyStatus.ERROR, request_id=request_id, error=ErrorInfo(code, message))


Answered = ExpiringMemory[str, Reply]


class Starter:
    def __init__(
        self,
        qrs: QrsClient,
        policy: PolicySettings,
        *,
        answered: Answered | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`answered`: the requestId memory, passed in so that it outlives a reload."""
        self._qrs = qrs
        self._policy = policy
        self._allow = allow_list(policy)
        self._clock = clock
        self._answered = answered if answered is not None else Answered(policy.dedupe_window_s)
        self._answered.window_s = policy.dedupe_window_s
        self._pending: dict[str, asyncio.Future[Reply]] = {}

    async def handle(self, request: Request) -> Handled:
        request_id = request.request_id
        if request_id is not None:
            known = self._answered.get(request_id, self._clock())
            if known is None and request_id in self._pending:
                known = await asyncio.shield(self._pending[request_id])
            if known is not None:
                return Handled(known, replayed=True)
            self._pending[request_id] = asyncio.get_running_loop().create_future()
        try:
            reply = await self._handle(request)
        except BaseException:
            if request_id is not None:
                self._pending.pop(request_id).cancel()
            raise
        if request_id is not None:
            self._pending.pop(request_id).set_result(reply)
            # A refusal for a passing reason (QRS down) must not stick to the requestId.
            if reply.error is None or reply.error.code not in ("qrs_unavailable", "internal"):
                self._answered.put(request_id, reply, self._clock())
        return Handled(reply)

    async def _handle(self, request: Request) -> Reply:
        limit = self._policy.max_tasks_per_request
        try:
            long = next((sel for sel in request.selectors if too_long(sel)), None)
            if long is not None:
                raise BadPayload(
                    f"{long.label[:60]}...: a selector value may have at most"
                    f" {MAX_VALUE_LENGTH} characters"
                )
            if len(request.selectors) > limit:
                raise TooManyTasks(f"{len(request.selectors)} selectors; the limit is {limit}")
            resolution = await self._qrs.resolve(
                request.selectors, all_task_ids_must_exist=request.all_task_ids_must_exist
            )
            if len(resolution.tasks) > limit:
                raise TooManyTasks(
                    f"the selectors match {len(resolution.tasks)} tasks; the limit is {limit}"
                )
        except (QrsError, TooManyTasks, BadPayload) as exc:
            return error_reply(request.request_id, exc.code, str(exc))
        decisions = [
            decide(
                r,
                self._allow,
                start_running=self._policy.on_running == "start",
                dry_run=request.dry_run,
            )
            for r in resolution.tasks
        ]
        outcomes = await asyncio.gather(*(self._carry_out(d) for d in decisions))
        outcomes += [
            TaskOutcome(
                w.task,
                w.matched_by,
                TaskResult.DENIED,
                error="allTaskIdsMustExist: an id in the request is unknown or invalid",
            )
            for w in resolution.withheld
        ]
        status = reply_status(outcomes, len(resolution.unmatched), finished=False)
        return Reply(
            status,
            request_id=request.request_id,
            outcomes=tuple(outcomes),
            unmatched=resolution.unmatched,
        )

    async def _carry_out(self, decision: Decision) -> TaskOutcome:
        task, ways = decision.resolved.task, decision.resolved.matched_by
        if not decision.start:
            assert decision.result is not None
            return TaskOutcome(task, ways, decision.result, error=decision.error)
        started = await self._qrs.start_task(task)
        if started.result in (TaskResult.FAILED, TaskResult.UNKNOWN, TaskResult.NOT_STARTED):
            logger.warning(
                "starting task {} ({}): {}: {}", task.id, task.name, started.result, started.error
            )
        return TaskOutcome(
            task, ways, started.result, execution_id=started.execution_id, error=started.error
        )


def finished_reply(accepted: Reply, finals: dict[str, TaskOutcome]) -> Reply:
    """The `finished` reply: the accepted one with each started task's final state."""
    outcomes = tuple(finals.get(o.task.id, o) for o in accepted.outcomes)
    return Reply(
        reply_status(outcomes, len(accepted.unmatched), finished=True),
        stage="finished",
        request_id=accepted.request_id,
        outcomes=outcomes,
        unmatched=accepted.unmatched,
    )
