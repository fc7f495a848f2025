"""Selector resolution: union, matchedBy, unmatched reasons, allTaskIdsMustExist."""

from __future__ import annotations

from mqtt_starter.core.model import (
    CustomPropertyValue,
    Selector,
    SelectorKind,
    TaskRef,
    Unmatched,
    UnmatchedReason,
)
from mqtt_starter.core.resolution import resolve

SALES = TaskRef(
    id="11111111-1111-4111-8111-111111111111",
    name="Reload Sales",
    tags=("Nightly",),
    custom_properties=(CustomPropertyValue("taskGroup", "tasks1"),),
)
STOCK = TaskRef(id="22222222-2222-4222-8222-222222222222", name="Reload Stock", tags=("Nightly",))
ID = SelectorKind.ID
TAG = SelectorKind.TAG
CP = SelectorKind.CUSTOM_PROPERTY
NAME = SelectorKind.NAME


def labels(resolution_tasks: object) -> list[tuple[str, list[str]]]:
    return [(r.task.name, [s.match_label for s in r.matched_by]) for r in resolution_tasks]  # type: ignore[attr-defined]


def test_union_lists_every_way_a_task_matched_once() -> None:
    selectors = [
        Selector(ID, SALES.id.upper()),
        Selector(TAG, "nightly"),
        Selector(CP, "tasks1", "taskGroup"),
        Selector(NAME, "Reload Sales"),
    ]
    result = resolve(selectors, [SALES, STOCK, SALES])
    assert labels(result.tasks) == [
        ("Reload Sales", ["id", "tag:nightly", "cp:taskGroup=tasks1", "name"]),
        ("Reload Stock", ["tag:nightly"]),
    ]
    assert result.unmatched == ()


def test_unmatched_reasons() -> None:
    selectors = [
        Selector(ID, "not-a-guid"),
        Selector(ID, "33333333-3333-4333-8333-333333333333"),
        Selector(TAG, "None"),
        Selector(CP, "tasks9", "taskGroup"),
        Selector(NAME, "Missing"),
    ]
    result = resolve(selectors, [SALES])
    assert result.tasks == ()
    assert [(u.selector.label, u.reason) for u in result.unmatched] == [
        ("id:not-a-guid", UnmatchedReason.INVALID_ID),
        ("id:33333333-3333-4333-8333-333333333333", UnmatchedReason.NOT_FOUND),
        ("tag:None", UnmatchedReason.NO_TASKS),
        ("cp:taskGroup=tasks9", UnmatchedReason.NO_TASKS),
        ("name:Missing", UnmatchedReason.NOT_FOUND),
    ]


def test_candidates_that_do_not_match_are_dropped() -> None:
    # QRS may return more than asked (a filter quirk); the re-check keeps only real matches.
    result = resolve([Selector(TAG, "Q1'25")], [SALES, STOCK])
    assert result.tasks == ()
    assert result.unmatched == (Unmatched(Selector(TAG, "Q1'25"), UnmatchedReason.NO_TASKS),)


def test_all_task_ids_must_exist_withholds_id_only_tasks() -> None:
    selectors = [
        Selector(ID, SALES.id),
        Selector(ID, STOCK.id),
        Selector(ID, "bad"),
        Selector(NAME, "Reload Stock"),
    ]
    result = resolve(selectors, [SALES, STOCK], all_task_ids_must_exist=True)
    assert labels(result.tasks) == [("Reload Stock", ["name"])]
    assert labels(result.withheld) == [("Reload Sales", ["id"])]
    assert [u.reason for u in result.unmatched] == [UnmatchedReason.INVALID_ID]


def test_all_task_ids_must_exist_has_no_effect_when_all_exist() -> None:
    selectors = [Selector(ID, SALES.id), Selector(ID, STOCK.id)]
    result = resolve(selectors, [SALES, STOCK], all_task_ids_must_exist=True)
    assert [r.task.id for r in result.tasks] == [SALES.id, STOCK.id]
    assert result.withheld == ()


def test_repeated_selectors_count_once() -> None:
    result = resolve([Selector(TAG, "Nightly"), Selector(TAG, "Nightly")], [STOCK])
    assert labels(result.tasks) == [("Reload Stock", ["tag:Nightly"])]
