"""Following an execution through the simulator: every way it ends, and always ending."""

from __future__ import annotations

import asyncio

from mqtt_starter.core.model import Execution, FollowEnd, TaskRef, TaskResult, TaskStatus
from mqtt_starter.service.follow import Tracker
from mqtt_starter.simulators.qrs.server import QrsSimulator
from mqtt_starter.simulators.qrs.state import SimState
from mqtt_starter.sites.qrs import QrsClient
from tests.conftest import qrs_settings_for

SALES = TaskRef(id="11111111-1111-4111-8111-111111111111", name="Reload Sales")
BUDGET = TaskRef(id="44444444-4444-4444-8444-444444444444", name="Reload Budget")
LONG = TaskRef(id="99999999-9999-4999-8999-999999999999", name="Long Reload")


async def start(qrs: QrsClient, task: TaskRef) -> str:
    started = await qrs.start_task(task)
    assert started.result is TaskResult.STARTED and started.execution_id is not None
    return started.execution_id


async def test_a_run_is_followed_to_its_end(qrs: QrsClient, sim_state: SimState) -> None:
    execution_id = await start(qrs, SALES)
    seen: list[Execution] = []

    async def on_change(execution: Execution) -> None:
        seen.append(execution)

    end = await Tracker(qrs, 0.02).follow(SALES, execution_id, on_change, timeout_s=60)
    [result] = sim_state.executions[execution_id]
    assert end.succeeded and not end.timed_out and end.lost is None
    assert end.last is not None
    assert (end.last.status, end.last.duration_ms, end.last.result_id) == (
        TaskStatus.FINISHED_SUCCESS,
        result["duration"],
        result["id"],
    )
    states = [e.status for e in seen]
    assert states[-1] is TaskStatus.FINISHED_SUCCESS
    assert len(states) == len(set(states))  # each state reported once


async def test_a_retry_is_followed_under_the_same_session(
    qrs: QrsClient, sim_state: SimState
) -> None:
    execution_id = await start(qrs, BUDGET)
    end = await Tracker(qrs, 0.02).follow(BUDGET, execution_id, timeout_s=60)
    failed, retried = sim_state.executions[execution_id]
    assert (failed["status"], retried["status"]) == (8, 7)
    # The session's end is the retry's success, not the first attempt's failure.
    assert end.succeeded and end.last is not None and end.last.result_id == retried["id"]


async def test_following_ends_at_the_deadline_with_the_last_state(
    qrs: QrsClient, sim_state: SimState
) -> None:
    execution_id = await start(qrs, LONG)
    end = await Tracker(qrs, 0.02).follow(LONG, execution_id, timeout_s=0.3)
    assert end.timed_out and end.lost is None and not end.succeeded
    assert end.last is not None and end.last.status in (TaskStatus.TRIGGERED, TaskStatus.STARTED)
    assert execution_id in sim_state.sessions  # the run goes on; only following stopped


async def test_qrs_down_during_following_is_waited_out(qrs: QrsClient, sim_state: SimState) -> None:
    execution_id = await start(qrs, SALES)
    sim_state.faults.fail_next = 12  # three calls' worth of retries (4 attempts each)
    end = await Tracker(qrs, 0.02).follow(SALES, execution_id, timeout_s=60)
    assert end.succeeded
    assert [e.status for e in sim_state.journal].count(503) == 12


async def test_a_user_without_read_rights_gets_unknown(
    simulator: QrsSimulator, sim_state: SimState
) -> None:
    async with QrsClient(qrs_settings_for(simulator, user_id="reader")) as reader:
        execution_id = await start(reader, SALES)
        end = await Tracker(reader, 0.02).follow(SALES, execution_id, timeout_s=60)
    assert end == FollowEnd(
        None,
        lost="QRS shows no result and refuses the session: QRS refused GET"
        f" /qrs/executionsession/{execution_id}: HTTP 403 Forbidden",
    )
    assert [(e.path, e.status) for e in sim_state.journal][-2:] == [
        ("/qrs/executionresult/full", 200),
        (f"/qrs/executionsession/{execution_id}", 403),
    ]


async def test_an_execution_that_vanished_is_unknown(qrs: QrsClient) -> None:
    end = await Tracker(qrs, 0.02).follow(
        SALES, "12345678-0000-4000-8000-000000000000", timeout_s=60
    )
    assert end == FollowEnd(
        None,
        lost="QRS shows no result for the execution and its session has ended (no read rights"
        " on execution results, or they were deleted)",
    )


async def test_a_refused_read_ends_following(qrs: QrsClient, sim_state: SimState) -> None:
    execution_id = await start(qrs, LONG)
    sim_state.faults.fail_next, sim_state.faults.fail_status = 1, 403
    end = await Tracker(qrs, 0.02).follow(LONG, execution_id, timeout_s=60)
    assert end.lost is not None and end.lost.startswith("QRS refuses to show the execution:")
    assert end.last is None and not end.timed_out


async def test_one_query_per_interval_serves_every_follower(
    qrs: QrsClient, sim_state: SimState
) -> None:
    stock = TaskRef(id="22222222-2222-4222-8222-222222222222", name="Reload Stock")
    ids = [await start(qrs, t) for t in (SALES, stock, BUDGET)]
    sim_state.reset_journal()
    tracker = Tracker(qrs, 0.05)
    ends = await asyncio.gather(
        *(
            tracker.follow(t, i, timeout_s=60)
            for t, i in zip((SALES, stock, BUDGET), ids, strict=True)
        )
    )
    assert all(e.succeeded for e in ends)
    queries = [e for e in sim_state.journal if e.path == "/qrs/executionresult/full"]
    assert len(queries) == tracker.polls
    # Until the first run ended, every query asked for all three executions at once.
    first = queries[0].query["filter"]
    assert first == " or ".join(f"executionID eq {i}" for i in ids)
    sessions = [e for e in sim_state.journal if e.path.startswith("/qrs/executionsession/")]
    assert {e.path.rsplit("/", 1)[1] for e in sessions} == set(ids)
