"""Selectors plus what QRS returned for them → one entry per task, with every way it matched.

Pure: the QRS client fetches candidate tasks with filters from `qrs_query` and hands them here.
Rules (DESIGN.md section 2): selectors are united; a malformed id is `invalid_id`, an id or name
that finds nothing is `not_found`, a tag or custom property that finds nothing is `no_tasks`;
with allTaskIdsMustExist, one bad id withholds every task that only an id chose.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Sequence

from mqtt_starter.core.model import (
    Resolution,
    ResolvedTask,
    Selector,
    SelectorKind,
    TaskRef,
    Unmatched,
    UnmatchedReason,
)
from mqtt_starter.core.qrs_query import normalize_guid, selector_matches

_EMPTY_REASON = {
    SelectorKind.ID: UnmatchedReason.NOT_FOUND,
    SelectorKind.NAME: UnmatchedReason.NOT_FOUND,
    SelectorKind.TAG: UnmatchedReason.NO_TASKS,
    SelectorKind.CUSTOM_PROPERTY: UnmatchedReason.NO_TASKS,
    SelectorKind.SPACE: UnmatchedReason.NO_TASKS,
}


def dedupe_selectors(selectors: Iterable[Selector]) -> list[Selector]:
    """Selectors in first-seen order, ids normalised, repeats dropped."""
    seen: set[Selector] = set()
    result = []
    for selector in selectors:
        if selector.kind is SelectorKind.ID:
            guid = normalize_guid(selector.value)
            selector = Selector(SelectorKind.ID, guid) if guid else selector
        if selector not in seen:
            seen.add(selector)
            result.append(selector)
    return result


def queryable(
    selectors: Iterable[Selector], unsupported: Collection[SelectorKind] = ()
) -> list[Selector]:
    """The selectors worth sending to the site: everything but malformed ids and the kinds
    it has no equivalent for."""
    return [
        s
        for s in selectors
        if s.kind not in unsupported
        and (s.kind is not SelectorKind.ID or normalize_guid(s.value) is not None)
    ]


def resolve(
    selectors: Sequence[Selector],
    candidates: Iterable[TaskRef],
    *,
    all_task_ids_must_exist: bool = False,
    unsupported: Collection[SelectorKind] = (),
) -> Resolution:
    """Match `candidates` (whatever QRS returned for the filters) against `selectors`;
    selectors of an `unsupported` kind are `unsupported`."""
    selectors = dedupe_selectors(selectors)
    by_id: dict[str, TaskRef] = {}
    for task in candidates:
        by_id.setdefault(task.id, task)

    matched: dict[str, list[Selector]] = {}
    unmatched: list[Unmatched] = []
    for selector in selectors:
        if selector.kind in unsupported:
            unmatched.append(Unmatched(selector, UnmatchedReason.UNSUPPORTED))
            continue
        if selector.kind is SelectorKind.ID and normalize_guid(selector.value) is None:
            unmatched.append(Unmatched(selector, UnmatchedReason.INVALID_ID))
            continue
        hits = [t for t in by_id.values() if selector_matches(selector, t)]
        if not hits:
            unmatched.append(Unmatched(selector, _EMPTY_REASON[selector.kind]))
        for task in hits:
            matched.setdefault(task.id, []).append(selector)

    id_failed = all_task_ids_must_exist and any(
        u.selector.kind is SelectorKind.ID for u in unmatched
    )
    tasks: list[ResolvedTask] = []
    withheld: list[ResolvedTask] = []
    for task_id, ways in matched.items():
        if id_failed:
            others = tuple(s for s in ways if s.kind is not SelectorKind.ID)
            if not others:
                withheld.append(ResolvedTask(by_id[task_id], tuple(ways)))
                continue
            ways = list(others)
        tasks.append(ResolvedTask(by_id[task_id], tuple(ways)))
    return Resolution(tuple(tasks), tuple(unmatched), tuple(withheld))


def without_lineage(resolution: Resolution, lineage: frozenset[str]) -> Resolution:
    """A chain never starts a task that already ran in its lineage (the runs that led to this
    one through chains): such a task is unmatched as `chain_loop`, by id."""
    if not lineage:
        return resolution
    looped = [r for r in resolution.tasks if r.task.id in lineage]
    if not looped:
        return resolution
    return dataclasses.replace(
        resolution,
        tasks=tuple(r for r in resolution.tasks if r.task.id not in lineage),
        unmatched=(
            *resolution.unmatched,
            *(
                Unmatched(Selector(SelectorKind.ID, r.task.id), UnmatchedReason.CHAIN_LOOP)
                for r in looped
            ),
        ),
    )
