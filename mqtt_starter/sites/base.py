"""The typed seam between the use case and a Qlik site.

The request service, the follower, `check` and `tasks` depend on `Backend` alone. The QRS
client implements it; a Qlik Cloud client will; tests use a fake of it. A backend raises the
QrsError subclasses of errors.py: QrsUnavailable when the site cannot be reached (after its own
retries), QrsAuthError when it refuses who we are, QrsRequestError when it refuses what it was
asked. `start_task` never raises for a task: what became of the start is its StartResult.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from loguru import logger

from mqtt_starter.core.errors import LogNotReady, QrsError
from mqtt_starter.core.model import (
    Execution,
    ReloadOptions,
    Resolution,
    Selector,
    SelectorKind,
    StartResult,
    TaskRef,
)
from mqtt_starter.core.resolution import dedupe_selectors, queryable, resolve


class Backend(Protocol):
    """The seam between the use case and a Qlik site (QRS or Qlik Cloud)."""

    @property
    def last_success(self) -> float | None:
        """Monotonic time of the last call the site answered; None before the first."""
        ...

    # "qrs" (client-managed Sense) or "cloud" (a Qlik Cloud tenant)
    site: str
    # selector kinds the site has no equivalent for (answered `unsupported`)
    unsupported: frozenset[SelectorKind]

    async def about(self) -> dict[str, Any]:
        """The site's identity (build, version): the cheap reachability check."""
        ...

    async def task_count(self) -> int | None:
        """How many tasks this identity can see."""
        ...

    async def find_tasks(self, selectors: Sequence[Selector]) -> list[TaskRef]:
        """Candidates for `selectors` (queryable ones only); the caller re-checks them."""
        ...

    async def all_tasks(self) -> list[TaskRef]: ...

    async def task(self, task_id: str) -> TaskRef | None:
        """The task as it is now, None when it does not exist."""
        ...

    async def start_task(self, task: TaskRef, options: ReloadOptions | None = None) -> StartResult:
        """Start `task` (as read before the start); never sent twice. `options`: a Qlik Cloud
        reload's (the request service refuses them for a QRS site)."""
        ...

    async def execution_results(self, execution_id: str) -> list[Execution]:
        """Every attempt of an execution (retries add attempts)."""
        ...

    async def execution_alive(self, execution_id: str) -> bool:
        """Whether the execution is still going on (it may yet retry)."""
        ...

    async def executions_of(self, execution_ids: Sequence[str]) -> list[Execution]:
        """Every attempt of each given execution, in as few calls as the site allows."""
        ...

    async def changed_executions(self, since: str) -> list[Execution]:
        """Every attempt the site changed at or after `since` (ISO 8601 UTC, the site's
        clock): one call, whatever the number of tasks."""
        ...

    async def calibrate_dates(self) -> bool:
        """Learn how the site reads a date in a filter and correct for it (qrs-api.md section
        6); whether it could be measured. `date_note` says what was found."""
        ...

    @property
    def date_note(self) -> str:
        """What `calibrate_dates` found, in words."""
        ...

    async def script_log_tail(self, task: TaskRef, execution: Execution, lines: int) -> str | None:
        """The end of the attempt's script log; None when the run has none; LogNotReady when
        the site has not written it yet."""
        ...

    async def close(self) -> None: ...


async def resolve_selectors(
    backend: Backend, selectors: Sequence[Selector], *, all_task_ids_must_exist: bool = False
) -> Resolution:
    """Selectors → tasks, each once with every selector that matched it (core `resolve`)."""
    selectors = dedupe_selectors(selectors)
    wanted = queryable(selectors, backend.unsupported)
    candidates = await backend.find_tasks(wanted) if wanted else []
    return resolve(
        selectors,
        candidates,
        all_task_ids_must_exist=all_task_ids_must_exist,
        unsupported=backend.unsupported,
    )


# Butler's patience with a log that is not written yet: 0.5 s, then 3 times 2 s apart.
LOG_RETRY_S = (0.5, 2.0, 2.0, 2.0)


async def contained_log_tail(
    read: Callable[[], Awaitable[str | None]], waits: Sequence[float], what: str
) -> str | None:
    """A run's log tail, asked again after each of `waits` while it is not written yet; None
    when it has none, cannot be read, or never came. Never raises: a log that cannot be read
    leaves its run with the run's own details, and is logged with the run it concerns."""
    for wait in (*waits, None):
        try:
            return await read()
        except LogNotReady as exc:
            if wait is None:
                logger.warning("the log of {} did not come in time: {}", what, exc)
                return None
            await asyncio.sleep(wait)
        except QrsError as exc:
            logger.warning("the log of {} cannot be read: {}", what, exc)
            return None
        except Exception:
            # Not a failure this code knows: logged with its traceback, and contained.
            logger.exception("reading the log of {} failed", what)
            return None
    return None
