"""The QRS client against the simulator over real mutual TLS, asserting the exact QRS calls."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trustme

from mqtt_starter.errors import QrsAuthError, QrsRequestError, QrsUnavailable
from mqtt_starter.model import Selector, SelectorKind, TaskStatus, UnmatchedReason
from mqtt_starter.qrs_client import QrsClient
from mqtt_starter.simulator.server import QrsSimulator
from mqtt_starter.simulator.state import SimState
from tests.conftest import qrs_settings_for, wait_until

SALES = "11111111-1111-4111-8111-111111111111"
STOCK = "22222222-2222-4222-8222-222222222222"
QUARTER = "66666666-6666-4666-8666-666666666666"
ARCHIVE = "55555555-5555-4555-8555-555555555555"


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
    resolution = await qrs.resolve(selectors)
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
    resolution = await qrs.resolve([Selector(SelectorKind.ID, "nope")])
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
    resolution = await qrs.resolve([Selector(SelectorKind.TAG, tag)])
    assert resolution.tasks == ()
    assert [u.reason for u in resolution.unmatched] == [UnmatchedReason.NO_TASKS]
    assert [e.status for e in sim_state.journal] == [200]
    assert sim_state.started == []


@pytest.mark.parametrize("tag", ["Q1'25", "back\\slash", "a&b#c+d/e%f", "Ünïcødé ☃"])
async def test_hostile_but_real_tags_are_found(qrs: QrsClient, tag: str) -> None:
    resolution = await qrs.resolve([Selector(SelectorKind.TAG, tag)])
    assert [r.task.id for r in resolution.tasks] == [QUARTER]


async def test_custom_property_decoy_does_not_match(qrs: QrsClient, sim_state: SimState) -> None:
    resolution = await qrs.resolve([Selector(SelectorKind.CUSTOM_PROPERTY, "tasks2", "taskGroup")])
    # QRS (like the simulator) returns the decoy: taskGroup=tasks1 and Other=tasks2 satisfy
    # each clause on different entries. The re-check drops it.
    [entry] = sim_state.journal
    assert entry.status == 200
    assert [r.task.name for r in resolution.tasks] == ["Reload Stock"]


async def test_start_follow_and_read_task_state(qrs: QrsClient, sim_state: SimState) -> None:
    session = await qrs.start_task(SALES)
    assert session is not None and session in sim_state.sessions
    assert await qrs.start_task(SALES) is None  # already running: the empty GUID

    async def finished() -> bool:
        results = await qrs.execution_results(session)
        return bool(results) and results[-1].status is TaskStatus.FINISHED_SUCCESS

    await wait_until(finished, what="the execution to finish")
    [result] = await qrs.execution_results(session)
    assert (result.task_id, result.execution_id) == (SALES, session)
    task = await qrs.task(SALES)
    assert task is not None and task.last_status is TaskStatus.FINISHED_SUCCESS
    assert await qrs.task("99999999-0000-4000-8000-000000000000") is None
    assert calls(sim_state)[:2] == [("POST", f"/qrs/task/{SALES}/start/synchronous", "", 201)] * 2
    assert sim_state.started == [SALES]


async def test_disabled_task_is_not_started(qrs: QrsClient, sim_state: SimState) -> None:
    assert await qrs.start_task(ARCHIVE) is None
    assert sim_state.started == []


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
    with pytest.raises(QrsRequestError) as info:
        await qrs.start_task("99999999-0000-4000-8000-000000000000")
    assert info.value.status == 404
    assert [e.status for e in sim_state.journal] == [404]


async def test_timeouts_are_retried(simulator: QrsSimulator, sim_state: SimState) -> None:
    sim_state.faults.hang_next, sim_state.faults.hang_s = 2, 5
    async with QrsClient(qrs_settings_for(simulator, timeout_s=0.3)) as client:
        assert (await client.about())["schemaPath"] == "About"
    assert [e.status for e in sim_state.journal][-1] == 200
    assert len(sim_state.journal) == 3


async def test_dropped_connections_are_retried(qrs: QrsClient, sim_state: SimState) -> None:
    sim_state.faults.drop_next = 2
    session = await qrs.start_task(SALES)
    assert session is not None
    assert [e.path for e in sim_state.journal] == [f"/qrs/task/{SALES}/start/synchronous"] * 3
    assert sim_state.started == [SALES]


async def test_concurrency_is_bounded(simulator: QrsSimulator, sim_state: SimState) -> None:
    sim_state.faults.delay_s = 0.05
    async with QrsClient(qrs_settings_for(simulator, max_concurrency=3)) as client:
        await asyncio.gather(*(client.about() for _ in range(12)))
    assert len(sim_state.journal) == 12
    assert sim_state.peak_in_flight == 3


async def test_wrong_client_certificate_is_refused(simulator: QrsSimulator, tmp_path: Path) -> None:
    other = trustme.CA().issue_cert("QlikClient")
    cert, key = tmp_path / "client.pem", tmp_path / "client_key.pem"
    other.cert_chain_pems[0].write_to_path(str(cert))
    other.private_key_pem.write_to_path(str(key))
    settings = qrs_settings_for(simulator, cert_file=cert, key_file=key)
    async with QrsClient(settings) as client:
        # TLS 1.3: the server checks the client certificate after the client's handshake is
        # done, so the refusal arrives as a disconnect; the message says what it may mean.
        with pytest.raises(QrsUnavailable, match=r"Server disconnected.*client certificate"):
            await client.about()
    assert simulator.state is not None and simulator.state.journal == []


async def test_untrusted_server_certificate_fails_without_retry(
    simulator: QrsSimulator, tmp_path: Path
) -> None:
    foreign_root = tmp_path / "root.pem"
    trustme.CA().cert_pem.write_to_path(str(foreign_root))
    settings = qrs_settings_for(simulator, ca_file=foreign_root)
    async with QrsClient(settings) as client:
        with pytest.raises(QrsAuthError, match="TLS verification"):
            await client.about()


async def test_jwt_through_a_virtual_proxy(simulator: QrsSimulator) -> None:
    sim = QrsSimulator(simulator.fixture, simulator.certs, prefix="/jwt", token="t0ken")
    await sim.start()
    try:
        good = qrs_settings_for(sim, auth="jwt", jwt="t0ken")
        assert urlsplit(good.url).path == "/jwt"
        async with QrsClient(good) as client:
            resolution = await client.resolve([Selector(SelectorKind.NAME, "Reload Sales")])
        assert [r.task.id for r in resolution.tasks] == [SALES]
        async with QrsClient(qrs_settings_for(sim, auth="jwt", jwt="wrong")) as client:
            with pytest.raises(QrsAuthError) as info:
                await client.about()
        assert info.value.status == 401
        assert "wrong" not in str(info.value)
        assert sim.state is not None
        assert [(e.path, e.status) for e in sim.state.journal] == [
            ("/qrs/task/full", 200),
            ("/qrs/about", 401),
        ]
    finally:
        await sim.stop()
