"""Decisions, given values and `now`: the allow-list, what to do with each task, dedupe, debounce.

Pure: these return decisions and never act (no QRS call, no clock read: `now` comes in).
A task that is running (Triggered, Queued, Started, Retry, AbortInitiated, Aborting) is not
started again unless `on_running` says `start`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from mqtt_starter.core.model import Request, ResolvedTask, TaskRef, TaskResult, TaskStatus
from mqtt_starter.core.qrs_query import normalize_guid

RUNNING = frozenset(
    {
        TaskStatus.TRIGGERED,
        TaskStatus.QUEUED,
        TaskStatus.STARTED,
        TaskStatus.RETRY,
        TaskStatus.ABORT_INITIATED,
        TaskStatus.ABORTING,
    }
)


@dataclass(frozen=True)
class AllowList:
    """Which tasks may be started: by id, by tag, by a custom property value, or (Qlik Cloud)
    by the app's space."""

    task_ids: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    custom_properties: frozenset[tuple[str, str]] = frozenset()
    spaces: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        task_ids: Iterable[str],
        tags: Iterable[str],
        custom_properties: Iterable[tuple[str, str]],
        spaces: Iterable[str] = (),
    ) -> AllowList:
        return cls(
            frozenset(normalize_guid(t) or t.strip().lower() for t in task_ids),
            frozenset(t.casefold() for t in tags),
            frozenset((n.casefold(), v.casefold()) for n, v in custom_properties),
            frozenset(s.casefold() for s in spaces),
        )

    def allows(self, task: TaskRef) -> bool:
        return (
            task.id.lower() in self.task_ids
            or any(t.casefold() in self.tags for t in task.tags)
            or (bool(task.space) and task.space.casefold() in self.spaces)
            or any(
                (cp.name.casefold(), cp.value.casefold()) in self.custom_properties
                for cp in task.custom_properties
            )
        )


@dataclass(frozen=True)
class Decision:
    """START, or the result the task gets without a start call."""

    resolved: ResolvedTask
    start: bool
    result: TaskResult | None = None
    error: str | None = None


def decide(
    resolved: ResolvedTask, allow: AllowList | None, *, start_running: bool, dry_run: bool
) -> Decision:
    task = resolved.task
    if allow is not None and not allow.allows(task):
        return Decision(resolved, False, TaskResult.DENIED, "not in policy.allow")
    if not task.enabled:
        return Decision(resolved, False, TaskResult.DISABLED)
    if task.last_status in RUNNING and not start_running:
        return Decision(resolved, False, TaskResult.ALREADY_RUNNING)
    if dry_run:
        return Decision(resolved, False, TaskResult.DRY_RUN)
    return Decision(resolved, True)


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ExpiringMemory(Generic[K, V]):
    """Values remembered for `window_s`, at most `capacity` of them (the oldest go first)."""

    def __init__(self, window_s: float, capacity: int = 100_000) -> None:
        self.window_s = window_s
        self.capacity = capacity
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K, now: float) -> V | None:
        self._expire(now)
        item = self._items.get(key)
        return item[1] if item is not None else None

    def put(self, key: K, value: V, now: float) -> None:
        self._items.pop(key, None)
        self._items[key] = (now, value)
        self._expire(now)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self._items:
            key, (stamp, _) = next(iter(self._items.items()))
            if now - stamp < self.window_s:
                break
            del self._items[key]

    def __len__(self) -> int:
        return len(self._items)


class Debouncer:
    """Leading edge: the first trigger of a burst passes; more within `window_s` do not.

    The window restarts only when a trigger passes, so a steady stream starts the tasks once per
    window rather than never.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        self._last: OrderedDict[Hashable, float] = OrderedDict()
        self.capacity = capacity

    def admit(self, key: Hashable, window_s: float, now: float) -> bool:
        if window_s <= 0:
            return True
        last = self._last.get(key)
        if last is not None and now - last < window_s:
            return False
        self._last.pop(key, None)
        self._last[key] = now
        while len(self._last) > self.capacity:
            self._last.popitem(last=False)
        return True


def request_key(request: Request, door: str, topic: str) -> Hashable:
    """What makes a request a repeat (DESIGN.md section 2): the same `requestId` and the same
    ask (door, topic, selectors, options). Where the reply goes and whether to wait are not
    part of it: a repeat may ask to wait for what the first started."""
    asked = dataclasses.replace(request, reply_to=None, wait=False, wait_timeout_s=None)
    return (request.request_id, door, topic, asked)
