"""The client's reads for the monitor, against the simulator: what changed since a moment, and
the tail of a script log through either generation of the call."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from mqtt_starter.core.model import Execution, TaskRef, TaskStatus
from mqtt_starter.core.monitoring import log_tail
from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.qrs.fixtures import Fixture, Outcome, TaskFixture
from mqtt_starter.simulators.qrs.server import QrsSimulator
from mqtt_starter.simulators.qrs.state import SimState
from mqtt_starter.sites.qrs import QrsClient
from mqtt_starter.sites.qrs_api import LOG_TAIL_BYTES
from tests.conftest import qrs_settings_for, wait_until

BIG = "0b000000-0000-4000-8000-000000000001"
SMALL = "0b000000-0000-4000-8000-000000000002"
EXTERNAL = "0b000000-0000-4000-8000-000000000003"


def fixture(api: str) -> Fixture:
    return Fixture(
        script_log_api=api,
        tasks=[
            TaskFixture(id=BIG, name="Big / Log", outcome=Outcome(
                duration_s=0.01, result="fail", message="Table not found", log_lines=10000)),
            TaskFixture(id=SMALL, name="Small", outcome=Outcome(duration_s=0.01)),
            TaskFixture(id=EXTERNAL, name="Export", type="external",
                        outcome=Outcome(duration_s=0.01)),
        ],
    )  # fmt: skip


@pytest.fixture(params=["both", "new", "old"])
async def site(
    request: pytest.FixtureRequest, certs: CertPaths
) -> AsyncIterator[tuple[QrsClient, SimState]]:
    sim = QrsSimulator(fixture(request.param), certs)
    await sim.start()
    assert sim.state is not None
    async with QrsClient(qrs_settings_for(sim)) as client:
        yield client, sim.state
    await sim.stop()


async def run(client: QrsClient, state: SimState, task_id: str) -> Execution:
    execution_id = state.fire(state.tasks[task_id])
    await wait_until(lambda: execution_id not in state.sessions, what="the run's end")
    [result] = await client.execution_results(execution_id)
    return result


async def test_the_tail_of_a_large_log_is_read_in_bounded_memory(
    site: tuple[QrsClient, SimState],
) -> None:
    client, state = site
    result = await run(client, state, BIG)
    assert result.status is TaskStatus.FINISHED_FAIL and result.script_log
    text = state.logs[result.result_id]
    assert len(text.encode()) > 2 * LOG_TAIL_BYTES
    task = TaskRef(id=BIG, name="Big / Log")
    assert await client.script_log_tail(task, result, 30) == log_tail(text, 30)
    downloads = [e for e in state.journal if e.path.startswith("/qrs/download/")]
    [download] = downloads
    assert download.path.endswith("/Big_Log.log")
    generations = [e.path.rsplit("/", 1)[1] for e in state.journal if "/scriptlog" in e.path]
    assert (
        generations
        == {
            "both": ["scriptlogfile"],
            "new": ["scriptlogfile"],
            "old": ["scriptlogfile", "scriptlog"],
        }[state.script_log_api]
    )


async def test_runs_without_a_log(site: tuple[QrsClient, SimState]) -> None:
    client, state = site
    result = await run(client, state, EXTERNAL)
    assert (
        await client.script_log_tail(TaskRef(id=EXTERNAL, name="Export", task_type=1), result, 5)
        is None
    )
    assert not [e for e in state.journal if "scriptlog" in e.path]


async def test_what_changed_since_a_moment(site: tuple[QrsClient, SimState]) -> None:
    client, state = site
    first = await run(client, state, SMALL)
    second = await run(client, state, BIG)
    changed = await client.changed_executions(first.modified)
    assert [r.result_id for r in changed] == [first.result_id, second.result_id]
    assert [r.modified for r in changed] == [first.modified, second.modified]
    assert await client.changed_executions(second.modified) == [second]
