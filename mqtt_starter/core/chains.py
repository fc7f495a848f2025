"""Chains, decided without I/O (DESIGN.md section 11): which chains a run that ended fires,
and the request each one makes.

A chain fires once per upstream run that ends as its `on` says, whoever started that run. Its
request carries the run's lineage (the tasks that ran before it through chains), so that a
chain never starts a task twice in one lineage: a loop across chains stops there.
"""

from __future__ import annotations

from dataclasses import dataclass

from mqtt_starter.core.model import Request, Selector, TaskRef, TaskStatus

FAILURES = frozenset({TaskStatus.FINISHED_FAIL, TaskStatus.ERROR})


@dataclass(frozen=True)
class Chain:
    """A chain as the configuration gives it; names and tags compared without case."""

    name: str
    after_ids: frozenset[str]
    after_tags: frozenset[str]
    after_names: frozenset[str]
    on: str  # success | failure | finished
    start: tuple[Selector, ...]
    wait: bool = False

    def follows(self, task: TaskRef) -> bool:
        """Whether `task` is one of the chain's upstream tasks."""
        return (
            task.id in self.after_ids
            or task.name.casefold() in self.after_names
            or any(t.casefold() in self.after_tags for t in task.tags)
        )

    def fires(self, task: TaskRef, status: TaskStatus) -> bool:
        """Whether a run of `task` that ended in `status` fires the chain."""
        if not status.terminal or not self.follows(task):
            return False
        if self.on == "success":
            return status is TaskStatus.FINISHED_SUCCESS
        if self.on == "failure":
            return status in FAILURES
        return True

    def request(self, execution_id: str, lineage: frozenset[str]) -> Request:
        """The request the chain makes for the upstream run `execution_id`."""
        return Request(
            selectors=self.start,
            request_id=f"chain:{self.name}:{execution_id}",
            wait=self.wait,
            lineage=lineage,
        )
