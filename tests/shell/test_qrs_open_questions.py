"""Every answer of qrs-api.md section 6, the simulator set to give it, the client against it.

One test per answer (parametrised): the script log download's media type and charset, the
body of `scriptlogfile`, a server without the newer call, a log that is not written yet, how a
date in a filter is read, dates without milliseconds, the proxy's session cookie name, and a
start of a task already running.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mqtt_starter.core.errors import LogNotReady
from mqtt_starter.core.model import Execution, TaskRef, TaskResult, TaskStatus
from mqtt_starter.core.monitoring import RunLedger, log_tail, moment_of
from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.qrs.fixtures import Fixture, Outcome, TaskFixture, Variants
from mqtt_starter.simulators.qrs.server import QrsSimulator
from mqtt_starter.simulators.qrs.state import SimState
from mqtt_starter.sites.base import contained_log_tail
from mqtt_starter.sites.qrs import QrsClient
from tests.conftest import qrs_settings_for, wait_until
from tests.shell.test_qrs_tls_and_proxy import TOKEN

FAILS = "0c000000-0000-4000-8000-000000000001"
QUICK = "0c000000-0000-4000-8000-000000000002"
SLOW = "0c000000-0000-4000-8000-000000000003"
LINES = 5


def fixture(script_log_api: str = "both", **variants: Any) -> Fixture:
    return Fixture(
        script_log_api=script_log_api,
        variants=Variants(**variants),
        tasks=[
            TaskFixture(id=FAILS, name="Forecast", outcome=Outcome(
                duration_s=0.01, result="fail", message="Field 'Ümsatz' not found")),
            TaskFixture(id=QUICK, name="Quick", outcome=Outcome(duration_s=0.01)),
            TaskFixture(id=SLOW, name="Slow", outcome=Outcome(duration_s=30)),
        ],
    )  # fmt: skip


@contextlib.asynccontextmanager
async def site(
    certs: CertPaths, fix: Fixture, **settings: Any
) -> AsyncIterator[tuple[QrsClient, SimState]]:
    sim = QrsSimulator(fix, certs)
    await sim.start()
    assert sim.state is not None
    try:
        async with QrsClient(qrs_settings_for(sim, **settings)) as client:
            yield client, sim.state
    finally:
        await sim.stop()


async def run(client: QrsClient, state: SimState, task_id: str) -> Execution:
    execution_id = state.fire(state.tasks[task_id])
    await wait_until(lambda: execution_id not in state.sessions, what="the run's end")
    [result] = await client.execution_results(execution_id)
    return result


def log_calls(state: SimState) -> list[tuple[str, int]]:
    return [
        (e.path.split("/")[-1] if "/download/" not in e.path else "download", e.status)
        for e in state.journal
        if "scriptlog" in e.path or "/download/" in e.path
    ]


FORECAST = TaskRef(id=FAILS, name="Forecast")


@pytest.mark.parametrize("content_type", ["octet-stream", "text", "text-charset", "bom"])
async def test_the_log_download_in_any_media_type(certs: CertPaths, content_type: str) -> None:
    async with site(certs, fixture(log_content_type=content_type)) as (client, state):
        result = await run(client, state, FAILS)
        tail = await client.script_log_tail(FORECAST, result, LINES)
        assert tail == log_tail(state.logs[result.result_id], LINES)
        assert "Error: Field 'Ümsatz' not found" in tail  # UTF-8 without a charset
        assert not tail.startswith("\ufeff")


@pytest.mark.parametrize("body", ["string", "object"])
async def test_scriptlogfile_as_a_bare_string_or_an_object(certs: CertPaths, body: str) -> None:
    async with site(certs, fixture(log_call_body=body)) as (client, state):
        result = await run(client, state, FAILS)
        tail = await client.script_log_tail(FORECAST, result, LINES)
        assert tail == log_tail(state.logs[result.result_id], LINES)
        assert log_calls(state) == [("scriptlogfile", 200), ("download", 200)]


@pytest.mark.parametrize("status", [400, 404, 405, 500])
async def test_a_server_without_the_newer_call_gets_the_older(
    certs: CertPaths, status: int
) -> None:
    fix = fixture("old", missing_log_call_status=status)
    async with site(certs, fix) as (client, state):
        result = await run(client, state, FAILS)
        tail = await client.script_log_tail(FORECAST, result, LINES)
        assert tail == log_tail(state.logs[result.result_id], LINES)
        # A 5xx is retried first (qrs_settings_for: 4 attempts), a 4xx is not.
        newer = [("scriptlogfile", status)] * (4 if status == 500 else 1)
        assert log_calls(state) == [*newer, ("scriptlog", 200), ("download", 200)]


@pytest.mark.parametrize("answer", ["404", "empty"])
async def test_a_log_not_written_yet_is_asked_for_again(certs: CertPaths, answer: str) -> None:
    fix = fixture(log_ready_after_reads=2, log_not_ready_as=answer)
    async with site(certs, fix) as (client, state):
        result = await run(client, state, FAILS)
        with pytest.raises(LogNotReady):
            await client.script_log_tail(FORECAST, result, LINES)
        tail = await contained_log_tail(
            lambda: client.script_log_tail(FORECAST, result, LINES),
            [0.0, 0.0, 0.0, 0.0],
            "the test's run",
        )
        assert tail == log_tail(state.logs[result.result_id], LINES)
        if answer == "404":  # both calls say 404 (two reads), then the log is there
            expected = [("scriptlogfile", 404), ("scriptlog", 404)]
            expected += [("scriptlogfile", 200), ("download", 200)]
        else:  # the download is empty twice, then the log is there
            expected = [("scriptlogfile", 200), ("download", 200)] * 3
        assert log_calls(state) == expected


async def test_a_log_that_never_comes_leaves_none(certs: CertPaths, logged: list[str]) -> None:
    async with site(certs, fixture(log_ready_after_reads=1000)) as (client, state):
        result = await run(client, state, FAILS)
        tail = await contained_log_tail(
            lambda: client.script_log_tail(FORECAST, result, LINES), [0.0, 0.0], "run X"
        )
        assert tail is None
        assert any(m.startswith("the log of run X did not come in time") for m in logged)


@pytest.mark.parametrize(
    "offset_s",
    [0.0, -5 * 3600.0, 5.5 * 3600.0, 14 * 3600.0, -12 * 3600.0],
    ids=["utc", "west", "east-half-hour", "east-most", "west-most"],
)
async def test_filter_dates_read_as_local_time_are_measured_and_corrected(
    certs: CertPaths, offset_s: float
) -> None:
    async with site(certs, fixture(date_filter_offset_s=offset_s)) as (client, state):
        first = await run(client, state, QUICK)
        assert await client.calibrate_dates()
        assert client.date_offset_s == offset_s
        assert ("local time" in client.date_note) == bool(offset_s)
        second = await run(client, state, FAILS)
        changed = await client.changed_executions(second.modified)
        assert [r.result_id for r in changed] == [second.result_id]
        both = await client.changed_executions(first.modified)
        assert [r.result_id for r in both] == [first.result_id, second.result_id]


async def test_no_run_to_measure_against_is_said(certs: CertPaths) -> None:
    async with site(certs, fixture(date_filter_offset_s=3600)) as (client, _):
        assert not await client.calibrate_dates()
        assert client.date_note == (
            "no run in the last day to measure against: dates are sent as UTC"
        )
        assert client.date_offset_s == 0


@pytest.mark.parametrize("milliseconds", [True, False])
async def test_dates_with_and_without_milliseconds(certs: CertPaths, milliseconds: bool) -> None:
    async with site(certs, fixture(date_milliseconds=milliseconds)) as (client, state):
        first = await run(client, state, QUICK)
        second = await run(client, state, QUICK)
        assert ("." in first.modified) == milliseconds
        changed = await client.changed_executions(first.modified)
        assert {r.result_id for r in changed} == {first.result_id, second.result_id}
        ledger = RunLedger(overlap_s=0, lookback_s=60)
        assert {r.result_id for r in ledger.changes(changed)} == {first.result_id, second.result_id}
        ledger.taken_in(changed)
        assert ledger.cursor is not None
        assert moment_of(ledger.cursor) == moment_of(second.modified)


def test_dates_compare_as_moments_not_as_text() -> None:
    # As text "…24Z" sorts after "…24.500Z"; as moments it is earlier.
    whole = Execution(
        "e1", "t", TaskStatus.FINISHED_SUCCESS, result_id="r1", modified="2026-12-03T07:16:24Z"
    )
    later = Execution("e2", "t", TaskStatus.FINISHED_SUCCESS, result_id="r2",
                      modified="2026-12-03T07:16:24.500Z")  # fmt: skip
    ledger = RunLedger(overlap_s=0, lookback_s=60)
    assert [r.result_id for r in ledger.changes([later, whole])] == ["r1", "r2"]
    ledger.taken_in([later, whole])
    assert ledger.cursor == "2026-12-03T07:16:24.500Z"


@pytest.mark.parametrize(
    ("cookie", "configured"),
    [
        ("X-Qlik-Session", None),
        ("X-Qlik-Session-jwt", None),
        ("SenseSessionSite1", None),
        ("SenseSessionSite1", "SenseSessionSite1"),
    ],
)
async def test_the_proxy_session_cookie_under_any_name(
    certs: CertPaths, cookie: str, configured: str | None
) -> None:
    sim = QrsSimulator(fixture(session_cookie=cookie), certs, prefix="/jwt", token=TOKEN)
    await sim.start()
    try:
        settings = qrs_settings_for(sim, auth="jwt", jwt=TOKEN, session_cookie=configured)
        async with QrsClient(settings) as qrs:
            await qrs.about()
            await asyncio.gather(*(qrs.about() for _ in range(50)))
        assert sim.proxy is not None and len(sim.proxy.sessions) == 1
        assert sim.state is not None and {e.status for e in sim.state.journal} == {200}
    finally:
        await sim.stop()


@pytest.mark.parametrize(
    ("answer", "result"),
    [("empty-guid", TaskResult.ALREADY_RUNNING), ("new-session", TaskResult.STARTED)],
)
async def test_a_start_of_a_task_already_running(
    certs: CertPaths, answer: str, result: TaskResult
) -> None:
    async with site(certs, fixture(running_start=answer)) as (client, state):
        first = state.fire(state.tasks[SLOW])
        task = await client.task(SLOW)
        assert task is not None and not task.last_status.terminal
        started = await client.start_task(task)
        assert started.result is result
        if result is TaskResult.STARTED:
            assert started.execution_id not in (None, first)
            assert state.started == [SLOW]
        else:
            assert state.started == []
