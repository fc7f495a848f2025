"""Follows executions to their end with one QRS query per interval, however many are followed.

Every follower registers here, and one loop asks QRS each `poll_interval_s` for the results of
all followed executions at once (`executionID eq a or executionID eq b ...`, chunked by URL
size), then hands each follower its own. When the monitor watches the site, its query (what
changed since the last one) serves the followers too, and no second query is made.

A follower the monitor's query has not mentioned for a few intervals is asked about on its
own (a run whose task was deleted never changes again). For each follower, the newest attempt
tells the state; when it is terminal, the execution
session is asked once more, since a retry opens a new result under the same session: only a
gone session (404) ends the run. Following always ends (qrs-api.md section 4):
- at the run's final state;
- at the deadline, with the last state seen (`timed_out`): runs can hang in Triggered or
  Queued after a scheduler restart;
- as Unknown (`lost`) when QRS no longer lets it be followed: a refusal (401/403, another 4xx),
  or no result at all once the session has ended (a user without read rights on
  ExecutionResult gets `[]`, not an error).
QRS being briefly unreachable is logged and polling goes on, up to the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Protocol

from loguru import logger

from mqtt_starter.core.errors import QrsAuthError, QrsError, QrsRequestError, QrsUnavailable
from mqtt_starter.core.model import Execution, FollowEnd, TaskRef
from mqtt_starter.core.qrs_query import latest_execution
from mqtt_starter.service.claims import Claims
from mqtt_starter.service.follower import Follower, OnChange
from mqtt_starter.sites.base import Backend

# A follower the monitor's query has not mentioned this many times in a row is asked about on
# its own: a run whose task was deleted never changes again, and would wait to its deadline.
QUIET_TICKS = 3


class ChangeSource(Protocol):
    """The monitor, seen from here: a query of what changed that can serve followers."""

    @property
    def interval_s(self) -> float: ...

    @property
    def active(self) -> bool: ...

    async def poll(self) -> list[Execution]:
        """One interval's query (and what the monitor publishes of it); its answer."""
        ...

    def covers(self, task: TaskRef) -> bool:
        """Whether a monitor (this instance's or another's) publishes the status events of
        `task`'s runs."""
        ...


class Tracker:
    """Follows executions to their end, one query per interval for all of them."""

    def __init__(
        self,
        qrs: Backend,
        poll_interval_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._qrs = qrs
        self._interval = poll_interval_s
        self._clock = clock
        self._followers: list[Follower] = []
        self._source: ChangeSource | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self.polls = 0  # queries made for followers and the monitor
        self.claims = Claims()

    @property
    def following(self) -> int:
        return len(self._followers)

    def attach(self, source: ChangeSource | None) -> None:
        """Let the monitor's query serve the followers (None: detach it)."""
        self._source = source
        self._kick()

    def covered(self, task: TaskRef) -> bool:
        """Whether a monitor (this instance's or another's) publishes this task's status
        events: then followers do not."""
        source = self._source
        return source is not None and source.covers(task)

    async def follow(
        self,
        task: TaskRef,
        execution_id: str,
        on_change: OnChange | None = None,
        *,
        timeout_s: float,
    ) -> FollowEnd:
        """How the execution ended; `on_change` is awaited for each new state seen."""
        follower = Follower(
            task, execution_id.lower(), on_change, self._clock() + timeout_s, timeout_s
        )
        self._followers.append(follower)
        self._kick()
        try:
            return await asyncio.shield(follower.done)
        finally:
            with contextlib.suppress(ValueError):
                self._followers.remove(follower)

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None

    # -- the loop ------------------------------------------------------------------------------

    def _monitoring(self) -> bool:
        return self._source is not None and self._source.active

    def _kick(self) -> None:
        self._wake.set()
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._run(), name="follow-executions")

    async def _run(self) -> None:
        while self._followers or self._monitoring():
            self._wake.clear()
            began = self._clock()
            try:
                await self._tick()
            except Exception:
                # One bad tick must not end following for everyone: log it and go on.
                logger.exception("polling QRS for execution results failed")
            if self._followers:
                interval = self._interval
                if self._monitoring():
                    assert self._source is not None
                    interval = min(interval, self._source.interval_s)
            elif self._monitoring():
                assert self._source is not None
                interval = self._source.interval_s
            else:
                return
            # Ticks keep their rate: the time a tick took counts towards the interval, but a
            # tick that overran still leaves QRS (and the event loop) a tenth of one.
            left = max(interval - (self._clock() - began), interval / 10)
            if not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)

    async def _tick(self) -> None:
        followers = [f for f in self._followers if not f.done.done()]
        try:
            if not (self._monitoring() and await self._tick_monitor(followers)) and followers:
                await self._tick_followers(followers)
        finally:
            # Deadlines pass whatever went wrong above: no follower waits past its own.
            self._expire(followers)

    async def _tick_monitor(self, followers: list[Follower]) -> bool:
        """The monitor's query, which serves the followers too; False when QRS refuses it
        (then the followers are polled on their own: they must not pay for it)."""
        assert self._source is not None
        self.polls += 1
        try:
            results = await self._source.poll()
        except QrsUnavailable as exc:
            logger.warning("monitor: {}", exc)
            return True
        except QrsError as exc:
            logger.error("monitor: QRS refuses the query of what changed: {}", exc)
            return False
        except Exception:
            # A failure of the monitor's own: the followers are served by their own query.
            logger.exception("monitor: the query of what changed failed")
            return False
        await self._dispatch(followers, results, complete=False)
        mentioned = {r.execution_id for r in results}
        quiet = []
        for follower in followers:
            follower.quiet = 0 if follower.execution_id in mentioned else follower.quiet + 1
            if follower.quiet >= QUIET_TICKS and not follower.done.done():
                follower.quiet = 0
                quiet.append(follower)
        if quiet:
            await self._tick_followers(quiet)
        return True

    async def _tick_followers(self, followers: list[Follower]) -> None:
        self.polls += 1
        try:
            results = await self._qrs.executions_of([f.execution_id for f in followers])
        except QrsUnavailable as exc:
            logger.warning("polling execution results: {}", exc)
            return
        except (QrsAuthError, QrsRequestError) as exc:
            for follower in followers:
                follower.end(
                    FollowEnd(follower.last, lost=f"QRS refuses to show the execution: {exc}")
                )
            return
        await self._dispatch(followers, results, complete=True)

    def _expire(self, followers: list[Follower]) -> None:
        now = self._clock()
        for follower in followers:
            if not follower.done.done() and now >= follower.deadline:
                last = follower.last
                logger.warning(
                    "stopped following execution {} of task {} after {:.0f} s: last state {}",
                    follower.execution_id,
                    follower.task.id,
                    follower.timeout_s,
                    last.status.qrs_name if last else "none seen",
                )
                follower.end(FollowEnd(last, timed_out=True))

    async def _dispatch(
        self, followers: list[Follower], results: list[Execution], *, complete: bool
    ) -> None:
        """Hand each follower its results. `complete`: the answer holds every attempt of each
        followed execution; else (the monitor's query) only those that changed."""
        mine: dict[str, list[Execution]] = {}
        for result in results:
            mine.setdefault(result.execution_id, []).append(result)
        to_check: list[tuple[Follower, Execution | None]] = []
        for follower in followers:
            latest = latest_execution(mine.get(follower.execution_id, ()))
            if latest is not None and (latest.result_id, int(latest.status)) != follower.seen:
                follower.seen = (latest.result_id, int(latest.status))
                follower.last = latest
                await follower.notify(latest)
            current = latest if complete or latest is not None else follower.last
            if current is None or current.status.terminal:
                to_check.append((follower, current))
        if to_check:
            await asyncio.gather(*(f.check_session(self._qrs, c) for f, c in to_check))
