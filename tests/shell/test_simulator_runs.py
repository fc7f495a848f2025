"""The simulator's side of watching every run, from qrs-api.md sections 4 and 5: script logs in
both generations, runs nobody started through the API, task deletion, and what changed since."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.qrs.fixtures import Fixture, Outcome, TaskFixture
from mqtt_starter.simulators.qrs.server import QrsSimulator
from tests.conftest import wait_until
from tests.shell.test_simulator import EMPTY, FORECAST, SALES, Raw, client_context, f, raw

__all__ = ["raw"]  # the fixture, shared with test_simulator

EXPORT = "88888888-8888-4888-8888-888888888888"


async def finished_result(raw: Raw, task_id: str, execution_id: str) -> dict[str, Any]:
    """The terminal execution result of a run, read through the API."""
    found: list[dict[str, Any]] = []

    async def ended() -> bool:
        _, results = await raw(
            "GET", "/qrs/executionresult/full", f(f"executionID eq {execution_id}")
        )
        found[:] = results
        return bool(results) and results[-1]["status"] in (6, 7, 8)

    await wait_until(ended, what=f"the run of {task_id} to end")
    return found[-1]


async def run(raw: Raw, task_id: str) -> dict[str, Any]:
    status, body = await raw("POST", f"/qrs/task/{task_id}/start/synchronous")
    assert status == 201
    return await finished_result(raw, task_id, body["value"])


async def test_a_failed_reload_has_its_log_through_the_newer_call(raw: Raw) -> None:
    result = await run(raw, FORECAST)
    assert result["scriptLogAvailable"] is True
    assert result["scriptLogSize"] > 0
    status, body = await raw(
        "GET", f"/qrs/reloadtask/{FORECAST}/scriptlogfile", f"executionResultId={result['id']}"
    )
    assert status == 200
    download = body  # a bare JSON string, as Qlik's reference shows
    assert isinstance(download, str)
    status, text = await raw("GET", f"/qrs/download/reloadtask/{download}/Reload Forecast.log")
    assert status == 200
    lines = text.splitlines()
    assert lines[-3:] == [
        lines[-3][:20] + "Error: Field 'Amount' not found",
        lines[-2][:20] + "Execution Failed",
        lines[-1][:20] + "Execution finished.",
    ]
    assert len(text.encode()) == result["scriptLogSize"]
    # A download id is good for one download.
    assert (await raw("GET", f"/qrs/download/reloadtask/{download}/x.log"))[0] == 404


async def test_the_older_call_finds_the_log_by_file_reference(raw: Raw) -> None:
    result = await run(raw, SALES)
    assert result["fileReferenceID"] != EMPTY
    status, body = await raw(
        "GET", f"/qrs/reloadtask/{SALES}/scriptlog", f"fileReferenceId={result['fileReferenceID']}"
    )
    assert status == 200
    status, text = await raw("GET", f"/qrs/download/reloadtask/{body['value']}/Reload Sales.log")
    assert status == 200
    assert text.splitlines()[-1].endswith("Execution finished.")
    assert (await raw("GET", f"/qrs/reloadtask/{SALES}/scriptlog", f"fileReferenceId={EMPTY}"))[
        0
    ] == 404


async def test_a_log_is_only_found_under_its_own_task(raw: Raw) -> None:
    result = await run(raw, SALES)
    status, _ = await raw(
        "GET", f"/qrs/reloadtask/{FORECAST}/scriptlogfile", f"executionResultId={result['id']}"
    )
    assert status == 404


async def test_external_programs_have_no_script_log(raw: Raw) -> None:
    result = await run(raw, EXPORT)
    assert result["scriptLogAvailable"] is False
    assert result["fileReferenceID"] == EMPTY
    status, _ = await raw(
        "GET", f"/qrs/reloadtask/{EXPORT}/scriptlogfile", f"executionResultId={result['id']}"
    )
    assert status == 404  # not a reload task


@pytest.mark.parametrize(("offered", "gone"), [("old", "scriptlogfile"), ("new", "scriptlog")])
async def test_a_server_offers_one_generation(
    certs: CertPaths, task_fixture: Fixture, offered: str, gone: str
) -> None:
    sim = QrsSimulator(task_fixture.model_copy(update={"script_log_api": offered}), certs)
    await sim.start()
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_context(certs))
        ) as session:
            raw = Raw(sim, session)
            result = await run(raw, SALES)
            query = {
                "scriptlogfile": f"executionResultId={result['id']}",
                "scriptlog": f"fileReferenceId={result['fileReferenceID']}",
            }
            kept = "scriptlog" if gone == "scriptlogfile" else "scriptlogfile"
            assert (await raw("GET", f"/qrs/reloadtask/{SALES}/{gone}", query[gone]))[0] == 404
            assert (await raw("GET", f"/qrs/reloadtask/{SALES}/{kept}", query[kept]))[0] == 200
    finally:
        await sim.stop()


@pytest.fixture
async def scheduled_raw(certs: CertPaths, task_fixture: Fixture) -> AsyncIterator[Raw]:
    fixture = task_fixture.model_copy(
        update={
            "tasks": [
                *task_fixture.tasks,
                TaskFixture(
                    id="eeeeeeee-eeee-4eee-8eee-eeeeeeeeeeee",
                    name="Hourly",
                    schedule_s=0.05,
                    outcome=Outcome(duration_s=0.01),
                ),
            ]
        }
    )
    sim = QrsSimulator(fixture, certs)
    await sim.start()
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_context(certs))
        ) as session:
            yield Raw(sim, session)
    finally:
        await sim.stop()


async def test_a_schedule_starts_runs_without_any_api_call(scheduled_raw: Raw) -> None:
    raw = scheduled_raw
    hourly = "eeeeeeee-eeee-4eee-8eee-eeeeeeeeeeee"

    async def two_finished() -> bool:
        _, results = await raw("GET", "/qrs/executionresult/full", f(f"taskID eq {hourly}"))
        return sum(bool(r["status"] == 7) for r in results) >= 2

    await wait_until(two_finished, what="two scheduled runs")
    _, journal = await raw("GET", "/_sim/journal", xrfkey=None)
    assert not [e for e in journal["entries"] if e["method"] == "POST"]
    assert journal["started"] == []
    assert journal["scheduled"][:2] == [hourly, hourly]


async def test_firing_a_schedule_on_demand(raw: Raw) -> None:
    status, body = await raw("POST", f"/_sim/tasks/{FORECAST}/fire", xrfkey=None)
    assert status == 201
    result = await finished_result(raw, FORECAST, body["value"])
    assert result["status"] == 8
    assert [d["message"] for d in result["details"]][:2] == [
        "Changing task state to Triggered",
        "Trigger fired: scheduled start",
    ]
    _, journal = await raw("GET", "/_sim/journal", xrfkey=None)
    assert journal["started"] == []
    assert journal["scheduled"] == [FORECAST]
    assert (await raw("POST", f"/_sim/tasks/{EMPTY}/fire", xrfkey=None))[0] == 404


async def test_deleting_a_task_takes_its_results_with_it(raw: Raw) -> None:
    result = await run(raw, SALES)
    assert (await raw("DELETE", f"/qrs/externalprogramtask/{SALES}"))[0] == 404
    assert (await raw("DELETE", f"/qrs/task/{SALES}"))[0] == 404  # /qrs/task/{id} does not exist
    assert (await raw("DELETE", f"/qrs/reloadtask/{SALES}"))[0] == 204
    assert await raw("GET", "/qrs/task/full", f(f"id eq {SALES}")) == (200, [])
    assert await raw("GET", "/qrs/executionresult/full", f(f"id eq {result['id']}")) == (200, [])
    assert (await raw("POST", f"/qrs/task/{SALES}/start"))[0] == 404
    assert (await raw("DELETE", f"/qrs/reloadtask/{SALES}"))[0] == 404


async def test_results_carry_their_modification_time(raw: Raw) -> None:
    before = await run(raw, SALES)
    assert before["createdDate"] <= before["modifiedDate"]
    mark = before["modifiedDate"]
    later = await run(raw, FORECAST)
    assert later["modifiedDate"] > mark
    status, changed = await raw("GET", "/qrs/executionresult/full", f(f"modifiedDate gt '{mark}'"))
    assert status == 200
    assert [r["id"] for r in changed] == [later["id"]]
    _, both = await raw("GET", "/qrs/executionresult/full", f(f"modifiedDate ge '{mark}'"))
    assert [r["id"] for r in both] == [before["id"], later["id"]]
    _, narrowed = await raw(
        "GET",
        "/qrs/executionresult/full",
        f(f"modifiedDate ge '{mark}' and taskID eq {SALES}"),
    )
    assert [r["id"] for r in narrowed] == [before["id"]]
    # Plain lists stay condensed.
    _, condensed = await raw("GET", "/qrs/executionresult", f(f"modifiedDate ge '{mark}'"))
    assert condensed == [
        {"id": before["id"], "privileges": None},
        {"id": later["id"], "privileges": None},
    ]
