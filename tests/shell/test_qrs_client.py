"""The QRS client against the simulator over real mutual TLS, asserting the exact QRS calls."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import trustme

from mqtt_starter.config import RetrySettings
from mqtt_starter.core.errors import QrsAuthError, QrsUnavailable
from mqtt_starter.core.model import (
    Selector,
    SelectorKind,
    StartResult,
    TaskRef,
    TaskResult,
    TaskStatus,
    UnmatchedReason,
)
from mqtt_starter.simulators.qrs.server import QrsSimulator
from mqtt_starter.simulators.qrs.state import SimState
from mqtt_starter.sites.base import resolve_selectors
from mqtt_starter.sites.qrs import QrsClient
from mqtt_starter.sites.qrs_api import qlik_user_header
from tests.conftest import qrs_settings_for, wait_until

SALES = "11111111-1111-4111-8111-111111111111"
STOCK = "22222222-2222-4222-8222-222222222222"
QUARTER = "66666666-6666-4666-8666-666666666666"
ARCHIVE = "55555555-5555-4555-8555-555555555555"
SYNC_USERS = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
NO_SCHEDULER = "dddddddd-dddd-4ddd-8ddd-dddddddddddd"


def calls(state: SimState) -> list[tuple[str, str, str, int]]:
    return [(e.method, e.path, e.query.get("filter", ""), e.status) for e in state.journal]


async def test_about(qrs: QrsClient, sim_state: SimState) -> None:
    about = await qrs.about()
    assert about["schemaPath"] == "About"
    [entry] = sim_state.journal
    assert set(entry.query) == {"xrfkey"} and len(entry.query["xrfkey"]) == 16


async def test_each_call_has_a_fresh_xrfkey(qrs: QrsClient, sim_state: SimState) -> None:
    await asyncio.gather(*(qrs.about() for _ in range(20)))
    assert len({e.query["xrfkey"] for e in sim_state.journal}) == 20


async def test_resolve_uses_one_query_and_reports_everything(
    qrs: QrsClient, sim_state: SimState
) -> None:
    selectors = [
        Selector(SelectorKind.ID, SALES.upper()),
        Selector(SelectorKind.ID, "bad-id"),
        Selector(SelectorKind.ID, "99999999-0000-4000-8000-000000000000"),
        Selector(SelectorKind.TAG, "Nightly"),
        Selector(SelectorKind.CUSTOM_PROPERTY, "tasks9", "taskGroup"),
        Selector(SelectorKind.NAME, "Reload Stock"),
    ]
    resolution = await resolve_selectors(qrs, selectors)
    assert [(r.task.name, [s.match_label for s in r.matched_by]) for r in resolution.tasks] == [
        ("Reload Sales", ["id", "tag:Nightly"]),
        ("Reload Stock", ["tag:Nightly", "name"]),
        ("Reload Archive", ["tag:Nightly"]),
    ]
    assert [(u.selector.label, u.reason) for u in resolution.unmatched] == [
        ("id:bad-id", UnmatchedReason.INVALID_ID),
        ("id:99999999-0000-4000-8000-000000000000", UnmatchedReason.NOT_FOUND),
        ("cp:taskGroup=tasks9", UnmatchedReason.NO_TASKS),
    ]
    assert calls(sim_state) == [
        (
            "GET",
            "/qrs/task/full",
            f"id eq {SALES} or id eq 99999999-0000-4000-8000-000000000000 or tags.name eq 'Nightly'"
            " or (customProperties.definition.name eq 'taskGroup' and customProperties.value eq"
            " 'tasks9') or name eq 'Reload Stock'",
            200,
        )
    ]


async def test_only_invalid_ids_make_no_query(qrs: QrsClient, sim_state: SimState) -> None:
    resolution = await resolve_selectors(qrs, [Selector(SelectorKind.ID, "nope")])
    assert [u.reason for u in resolution.unmatched] == [UnmatchedReason.INVALID_ID]
    assert sim_state.journal == []


@pytest.mark.parametrize(
    "tag",
    [
        "x' or name ne '",
        "x\\' or name ne \\'",
        "') or (id ne '",
        "Nightly' or tags.name ne 'x",
        "*",
        "%",
        "' or 1 eq 1 or '",
    ],
)
async def test_injection_in_a_tag_finds_and_starts_nothing(
    qrs: QrsClient, sim_state: SimState, tag: str
) -> None:
    # The escaping itself: QRS (the simulator) returns no task for the filter sent. The
    # re-check of resolution would hide a widened query, so candidates are asked for raw.
    assert await qrs.find_tasks([Selector(SelectorKind.TAG, tag)]) == []
    [entry] = sim_state.journal
    assert entry.status == 200
    escaped = tag.replace("\\", "\\\\").replace("'", "\\'")
    assert entry.query["filter"] == f"tags.name eq '{escaped}'"
    resolution = await resolve_selectors(qrs, [Selector(SelectorKind.TAG, tag)])
    assert resolution.tasks == ()
    assert [u.reason for u in resolution.unmatched] == [UnmatchedReason.NO_TASKS]
    assert sim_state.started == []


@pytest.mark.parametrize("tag", ["Q1'25", "back\\slash", "a&b#c+d/e%f", "Ünïcødé ☃"])
async def test_hostile_but_real_tags_are_found(qrs: QrsClient, tag: str) -> None:
    resolution = await resolve_selectors(qrs, [Selector(SelectorKind.TAG, tag)])
    assert [r.task.id for r in resolution.tasks] == [QUARTER]


async def test_custom_property_decoy_does_not_match(qrs: QrsClient, sim_state: SimState) -> None:
    resolution = await resolve_selectors(
        qrs, [Selector(SelectorKind.CUSTOM_PROPERTY, "tasks2", "taskGroup")]
    )
    # QRS (like the simulator) returns the decoy: taskGroup=tasks1 and Other=tasks2 satisfy
    # each clause on different entries. The re-check drops it.
    [entry] = sim_state.journal
    assert entry.status == 200
    assert [r.task.name for r in resolution.tasks] == ["Reload Stock"]


async def ref(qrs: QrsClient, task_id: str) -> TaskRef:
    """The task as resolution reads it before a start."""
    task = await qrs.task(task_id)
    assert task is not None
    return task


def start_path(task_id: str) -> str:
    return f"/qrs/task/{task_id}/start/synchronous"


def reread(task_id: str) -> tuple[str, str, str, int]:
    return ("GET", "/qrs/task/full", f"id eq {task_id}", 200)


async def test_start_follow_and_read_task_state(qrs: QrsClient, sim_state: SimState) -> None:
    sales = await ref(qrs, SALES)
    started = await qrs.start_task(sales)
    assert started.result is TaskResult.STARTED and started.error is None
    session = started.execution_id
    assert session is not None and session in sim_state.sessions
    # Started again while it runs: the empty GUID, and a re-read that finds it running.
    assert await qrs.start_task(sales) == StartResult(TaskResult.ALREADY_RUNNING)

    async def finished() -> bool:
        results = await qrs.execution_results(session)
        return bool(results) and results[-1].status is TaskStatus.FINISHED_SUCCESS

    await wait_until(finished, what="the execution to finish")
    [result] = await qrs.execution_results(session)
    assert (result.task_id, result.execution_id) == (SALES, session)
    task = await qrs.task(SALES)
    assert task is not None and task.last_status is TaskStatus.FINISHED_SUCCESS
    assert task.last_result_id == result.result_id != sales.last_result_id
    assert await qrs.task("99999999-0000-4000-8000-000000000000") is None
    assert calls(sim_state)[1:4] == [
        ("POST", start_path(SALES), "", 201),
        ("POST", start_path(SALES), "", 201),
        reread(SALES),
    ]
    # Following reads /full: the plain list is condensed.
    assert calls(sim_state)[4] == (
        "GET",
        "/qrs/executionresult/full",
        f"executionID eq {session}",
        200,
    )
    assert sim_state.started == [SALES]


async def test_declined_starts_are_explained_by_a_reread(
    qrs: QrsClient, sim_state: SimState
) -> None:
    assert await qrs.start_task(await ref(qrs, ARCHIVE)) == StartResult(TaskResult.DISABLED)
    no_scheduler = await ref(qrs, NO_SCHEDULER)
    assert await qrs.start_task(no_scheduler) == StartResult(
        TaskResult.NOT_STARTED,
        error="QRS did not start the task and gave no reason; it is enabled and its last run"
        " is NeverStarted: no scheduler available, or the app unavailable?",
    )
    assert calls(sim_state) == [
        reread(ARCHIVE),
        ("POST", start_path(ARCHIVE), "", 201),
        reread(ARCHIVE),
        reread(NO_SCHEDULER),
        ("POST", start_path(NO_SCHEDULER), "", 201),
        reread(NO_SCHEDULER),
    ]
    assert sim_state.started == []


async def test_a_refused_start_is_that_tasks_failure(qrs: QrsClient, sim_state: SimState) -> None:
    users = await ref(qrs, SYNC_USERS)
    assert users.type_name == "UserSync"
    assert await qrs.start_task(users) == StartResult(
        TaskResult.FAILED,
        error=f"QRS refused to start this UserSync task: HTTP 400 Task {SYNC_USERS} is a user"
        " synchronization task",
    )
    gone = TaskRef(id="99999999-0000-4000-8000-000000000000", name="Gone")
    assert await qrs.start_task(gone) == StartResult(
        TaskResult.FAILED,
        error="QRS refused to start this Reload task: HTTP 404 Task"
        " 99999999-0000-4000-8000-000000000000 not found",
    )
    # 4xx are not retried.
    assert [e.status for e in sim_state.journal][1:] == [400, 404]


@pytest.mark.parametrize("lose_as", ["drop", "503", "hang"])
async def test_a_lost_answer_is_not_sent_again_and_the_run_is_found(
    simulator: QrsSimulator, sim_state: SimState, lose_as: str
) -> None:
    async with QrsClient(qrs_settings_for(simulator, timeout_s=0.5)) as qrs:
        sales = await ref(qrs, SALES)
        sim_state.faults.lose_next, sim_state.faults.lose_as, sim_state.faults.hang_s = (
            1,
            lose_as,
            30,
        )
        sim_state.faults.path_contains = "/start"
        started = await qrs.start_task(sales)
    [session] = sim_state.executions
    assert started == StartResult(TaskResult.STARTED, execution_id=session)
    assert sim_state.started == [SALES]
    posts = [e for e in sim_state.journal if e.method == "POST"]
    assert len(posts) == 1
    assert calls(sim_state)[2:] == [
        reread(SALES),
        (
            "GET",
            "/qrs/executionresult/full",
            f"id eq {sim_state.executions[session][0]['id']}",
            200,
        ),
    ]


@pytest.mark.parametrize("fault", ["drop", "fail"])
async def test_a_start_that_may_have_failed_is_unknown_not_repeated(
    qrs: QrsClient, sim_state: SimState, fault: str
) -> None:
    sales = await ref(qrs, SALES)
    setattr(sim_state.faults, f"{fault}_next", 1)
    sim_state.faults.path_contains = "/start"
    started = await qrs.start_task(sales)
    assert started.result is TaskResult.UNKNOWN and started.execution_id is None
    assert started.error is not None
    assert started.error.startswith(
        f"the answer to the start was lost (QRS POST /qrs/task/{SALES}/start/synchronous: "
    )
    assert started.error.endswith(
        "and QRS shows no run that began after it: the task may or may not run"
    )
    assert [e.method for e in sim_state.journal] == ["GET", "POST", "GET"]
    assert sim_state.started == []


async def test_a_start_is_sent_again_when_it_never_left(
    simulator: QrsSimulator, sim_state: SimState
) -> None:
    refused = asyncio.Event()

    def observe(operation: str, seconds: float, status: int) -> None:
        if operation == "POST task" and status == 0:
            refused.set()

    settings = qrs_settings_for(
        simulator, retry=RetrySettings(attempts=100, backoff_s=0.01, max_backoff_s=0.02)
    )
    await simulator.suspend()
    async with QrsClient(settings, observer=observe) as qrs:
        start = asyncio.create_task(qrs.start_task(TaskRef(id=SALES, name="Reload Sales")))
        await asyncio.wait_for(refused.wait(), 10)
        await simulator.resume()
        started = await asyncio.wait_for(start, 10)
    assert started.result is TaskResult.STARTED
    assert started.execution_id in sim_state.sessions
    assert calls(sim_state) == [("POST", start_path(SALES), "", 201)]


async def test_503_three_times_then_success_is_retried(qrs: QrsClient, sim_state: SimState) -> None:
    sim_state.faults.fail_next = 3
    assert (await qrs.about())["schemaPath"] == "About"
    assert [e.status for e in sim_state.journal] == [503, 503, 503, 200]


async def test_qrs_down_longer_than_the_retry_budget(qrs: QrsClient, sim_state: SimState) -> None:
    sim_state.faults.fail_next = 10
    with pytest.raises(QrsUnavailable, match="after 4 attempt") as info:
        await qrs.about()
    assert info.value.code == "qrs_unavailable" and info.value.status == 503
    assert [e.status for e in sim_state.journal] == [503] * 4


async def test_404_is_not_retried(qrs: QrsClient, sim_state: SimState) -> None:
    assert not await qrs.execution_alive("99999999-0000-4000-8000-000000000000")
    assert await qrs.task("99999999-0000-4000-8000-000000000000") is None
    assert [e.status for e in sim_state.journal] == [404, 200]


async def test_timeouts_are_retried(simulator: QrsSimulator, sim_state: SimState) -> None:
    sim_state.faults.hang_next, sim_state.faults.hang_s = 2, 3600
    # A second is far more than a call on loopback takes, however loaded the machine: only
    # the two hung calls time out, so the call count is exact.
    async with QrsClient(qrs_settings_for(simulator, timeout_s=1.0)) as client:
        assert (await client.about())["schemaPath"] == "About"
    assert [e.status for e in sim_state.journal][-1] == 200
    assert len(sim_state.journal) == 3


async def test_dropped_connections_are_retried(qrs: QrsClient, sim_state: SimState) -> None:
    sim_state.faults.drop_next = 2
    tasks = await qrs.find_tasks([Selector(SelectorKind.ID, SALES)])
    assert [t.id for t in tasks] == [SALES]
    assert [e.status for e in sim_state.journal] == [0, 0, 200]


async def test_qlik_user_values_are_url_encoded(
    simulator: QrsSimulator, sim_state: SimState
) -> None:
    settings = qrs_settings_for(simulator, user_directory="CORP EU", user_id="jörg.o'neil%")
    async with QrsClient(settings) as client:
        await client.about()
    [entry] = sim_state.journal
    assert entry.user == "CORP EU\\jörg.o'neil%"
    assert qlik_user_header(settings) == ("UserDirectory=CORP%20EU; UserId=j%C3%B6rg.o%27neil%25")


async def test_concurrency_is_bounded(simulator: QrsSimulator, sim_state: SimState) -> None:
    sim_state.faults.open.clear()  # the simulator holds every call until it is opened
    async with QrsClient(qrs_settings_for(simulator, max_concurrency=3)) as client:
        calls = asyncio.gather(*(client.about() for _ in range(12)))
        await wait_until(lambda: sim_state.in_flight == 3, what="three calls in flight")
        sim_state.faults.open.set()
        await calls
    assert len(sim_state.journal) == 12
    # Three were held at once, and the client never sent a fourth while they were.
    assert sim_state.peak_in_flight == 3


async def test_wrong_client_certificate_is_refused_at_the_first_try(
    simulator: QrsSimulator, tmp_path: Path
) -> None:
    other = trustme.CA().issue_cert("QlikClient")
    cert, key = tmp_path / "client.pem", tmp_path / "client_key.pem"
    other.cert_chain_pems[0].write_to_path(str(cert))
    other.private_key_pem.write_to_path(str(key))
    attempts: list[int] = []
    settings = qrs_settings_for(simulator, cert_file=cert, key_file=key)
    async with QrsClient(settings, observer=lambda op, s, status: attempts.append(status)) as qrs:
        with pytest.raises(QrsAuthError) as info:
            await qrs.about()
    assert str(info.value) == (
        f"QRS {simulator.url} closed a new connection without answering: it does not accept"
        " the client certificate (qrs.cert_file, qrs.key_file); export client.pem,"
        " client_key.pem and root.pem again from the QMC"
    )
    assert attempts == [0]
    assert simulator.state is not None and simulator.state.journal == []


async def test_untrusted_server_certificate_fails_without_retry(
    simulator: QrsSimulator, tmp_path: Path
) -> None:
    foreign_root = tmp_path / "root.pem"
    trustme.CA().cert_pem.write_to_path(str(foreign_root))
    settings = qrs_settings_for(simulator, ca_file=foreign_root)
    async with QrsClient(settings) as client:
        with pytest.raises(QrsAuthError) as info:
            await client.about()
    assert str(info.value) == (
        f"TLS verification of {simulator.url} failed: self-signed certificate in certificate chain;"
        " the certificate is not signed by qrs.ca_file: set it to the root.pem exported from"
        " the QMC together with the client certificate"
    )
