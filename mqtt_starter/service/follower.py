"""One execution followed to its end: its deadline, the states seen, and how following ends
(qrs-api.md section 4): at the final state once the session is gone, or as Unknown when the
site no longer lets it be followed. A failure of one follower is its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from loguru import logger

from mqtt_starter.core.errors import QrsError, QrsUnavailable
from mqtt_starter.core.model import Execution, FollowEnd, TaskRef
from mqtt_starter.sites.base import Backend

OnChange = Callable[[Execution], Awaitable[None]]


@dataclass(eq=False)
class Follower:
    """One execution followed: its deadline, what was seen of it, and how it ended."""

    task: TaskRef
    execution_id: str
    on_change: OnChange | None
    deadline: float
    timeout_s: float
    done: asyncio.Future[FollowEnd] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    last: Execution | None = None
    seen: tuple[str, int] | None = None
    quiet: int = 0  # the monitor's queries in a row that did not mention it

    def end(self, end: FollowEnd) -> None:
        if not self.done.done():
            self.done.set_result(end)

    async def notify(self, execution: Execution) -> None:
        """Tell `on_change` of a new state; its failure is logged, never raised."""
        if self.on_change is None:
            return
        try:
            await self.on_change(execution)
        except Exception:
            logger.exception("reporting a state of execution {} failed", self.execution_id)

    async def check_session(self, backend: Backend, latest: Execution | None) -> None:
        """Ends following when the session is gone, or cannot be read; a failure of this
        follower's own is logged and ends it with what is known."""
        try:
            await self._check_session(backend, latest)
        except Exception:
            # One follower's failure is its own: logged, and it ends with what is known.
            logger.exception("following execution {} failed", self.execution_id)
            self.end(
                FollowEnd(latest)
                if latest is not None
                else FollowEnd(self.last, lost="following it failed (see the log)")
            )

    async def _check_session(self, backend: Backend, latest: Execution | None) -> None:
        try:
            alive = await backend.execution_alive(self.execution_id)
        except QrsUnavailable as exc:
            logger.warning("following execution {}: {}", self.execution_id, exc)
            return
        except QrsError as exc:
            if latest is not None:
                # The run's final state is known; whether a retry follows cannot be.
                self.end(FollowEnd(latest))
            else:
                self.end(
                    FollowEnd(
                        self.last,
                        lost=f"QRS shows no result and refuses the session: {exc}",
                    )
                )
            return
        if alive:
            return
        if latest is not None:
            self.end(FollowEnd(latest))
            return
        self.end(
            FollowEnd(
                self.last,
                lost="QRS shows no result for the execution and its session has ended"
                " (no read rights on execution results, or they were deleted)",
            )
        )
