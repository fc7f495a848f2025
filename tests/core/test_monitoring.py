"""The monitor's decisions without I/O: what is news, where the next query starts, who leads."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtt_starter.core.model import Execution, TaskStatus
from mqtt_starter.core.monitoring import (
    KnownRun,
    Peer,
    RunLedger,
    leader,
    log_tail,
    parse_iso,
)
from mqtt_starter.core.qrs_query import changed_filter

TASK = "0a000000-0000-4000-8000-000000000001"


def result(
    result_id: str, status: TaskStatus, modified: str, execution_id: str = "e1"
) -> Execution:
    return Execution(execution_id, TASK, status, result_id=result_id, modified=modified)


def ledger() -> RunLedger:
    return RunLedger(overlap_s=30, lookback_s=3600)


NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)


def test_the_first_query_looks_back_and_later_ones_start_at_the_newest_change() -> None:
    book = ledger()
    assert book.since(NOW) == "2026-11-29T10:59:30.000Z"  # lookback, then the overlap
    book.taken_in([result("r1", TaskStatus.STARTED, "2026-11-29T11:59:59.123Z")])
    assert book.since(NOW) == "2026-11-29T11:59:29.123Z"


def test_after_a_restart_the_retained_states_say_where_to_start() -> None:
    book = ledger()
    book.remember("a", KnownRun("e1", 7, "2026-11-29T11:00:00.000Z"))
    book.remember("b", KnownRun("e2", 8, "2026-11-29T11:30:00.000Z"))
    assert book.since(NOW) == "2026-11-29T11:29:30.000Z"


def test_a_change_seen_again_through_the_overlap_is_not_news() -> None:
    book = ledger()
    started = result("r1", TaskStatus.STARTED, "2026-11-29T11:00:00.000Z")
    assert book.changes([started]) == [started]
    book.mark(started)
    assert book.changes([started]) == []
    ended = result("r1", TaskStatus.FINISHED_SUCCESS, "2026-11-29T11:00:05.000Z")
    assert book.changes([ended]) == [ended]


def test_changes_come_oldest_first() -> None:
    book = ledger()
    late = result("r2", TaskStatus.TRIGGERED, "2026-11-29T11:00:02.000Z", "e2")
    early = result("r1", TaskStatus.FINISHED_FAIL, "2026-11-29T11:00:01.000Z")
    assert book.changes([late, early]) == [early, late]


def test_the_retained_state_tells_what_was_published_before_a_restart() -> None:
    book = ledger()
    book.remember(TASK, KnownRun("e2", 7, "2026-11-29T11:00:10.000Z"))
    published = result("r2", TaskStatus.FINISHED_SUCCESS, "2026-11-29T11:00:10.000Z", "e2")
    older_run = result("r1", TaskStatus.FINISHED_FAIL, "2026-11-29T11:00:01.000Z", "e1")
    newer_run = result("r3", TaskStatus.STARTED, "2026-11-29T11:00:20.000Z", "e3")
    assert book.changes([older_run, published, newer_run]) == [newer_run]
    # The same run in a later state is news.
    progressed = result("r2", TaskStatus.FINISHED_SUCCESS, "2026-11-29T11:00:10.000Z", "e2")
    book.remember(TASK, KnownRun("e2", 2, "2026-11-29T11:00:05.000Z"))
    assert book.changes([progressed]) == [progressed]


def test_a_cleared_state_forgets_the_task() -> None:
    book = ledger()
    book.remember(TASK, KnownRun("e1", 7, "2026-11-29T11:00:00.000Z"))
    book.remember(TASK, None)
    assert book.known == {}


def test_memory_is_pruned_behind_the_cursor() -> None:
    book = RunLedger(overlap_s=1, lookback_s=0, memory=2)
    old = [
        result(f"r{i}", TaskStatus.FINISHED_SUCCESS, "2026-11-29T10:00:00.000Z") for i in range(3)
    ]
    for r in old:
        book.mark(r)
    book.taken_in([result("r9", TaskStatus.STARTED, "2026-11-29T11:00:00.000Z")])
    # Beyond twice the overlap they cannot come back: forgotten.
    assert book.changes(old) == old


@pytest.mark.parametrize(
    ("data", "known"),
    [
        ({"executionId": "e", "stateCode": 7, "updatedAt": "t"}, KnownRun("e", 7, "t")),
        ({"executionId": "e", "stateCode": 7}, KnownRun("e", 7, "")),
        ({"executionId": "e", "stateCode": "7"}, None),
        ({"stateCode": 7}, None),
        ([1, 2], None),
        (None, None),
    ],
)
def test_a_retained_state_is_read_defensively(data: object, known: KnownRun | None) -> None:
    assert KnownRun.from_state(data) == known


def test_the_first_online_monitor_by_name_leads() -> None:
    peers = {
        "a": Peer(online=False, monitor=True),
        "b": Peer(online=True, monitor=True),
        "0": Peer(online=True, monitor=False),
    }
    assert leader("c", peers) == "b"
    assert leader("a", peers) == "a"  # itself, online by being here
    assert leader("c", {}) == "c"


@given(
    st.dictionaries(st.text(min_size=1, max_size=3), st.builds(Peer, st.booleans(), st.booleans()))
)
def test_every_instance_elects_the_same_leader(peers: dict[str, Peer]) -> None:
    candidates = [n for n, p in peers.items() if p.online and p.monitor]
    if not candidates:
        return
    views = {own: leader(own, {n: p for n, p in peers.items() if n != own}) for own in candidates}
    assert len(set(views.values())) == 1


def test_log_tail() -> None:
    text = "a\r\nb\r\n\r\nc\r\nd\r\n"
    assert log_tail(text, 2) == "c\nd"
    assert log_tail(text, 10) == "a\nb\nc\nd"
    assert log_tail(text, 0) == ""


def test_changed_filter_takes_only_a_time() -> None:
    assert (
        changed_filter("2026-11-29T11:00:00.000Z") == "modifiedDate ge '2026-11-29T11:00:00.000Z'"
    )
    with pytest.raises(ValueError, match="ISO 8601"):
        changed_filter("2026-11-29' or id ne '")


def test_parse_iso() -> None:
    assert parse_iso("2026-11-29T11:00:00.000Z") == datetime(2026, 11, 29, 11, tzinfo=UTC)
    assert parse_iso("never") is None
