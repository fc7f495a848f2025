"""The request and reply contract, the same against both kinds of site: every test here runs
once against the QRS simulator and once against the Qlik Cloud simulator, with a real broker
and the daemon in-process. What differs between the sites is in `Site`; nothing else is."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.cloud.fixtures import App, CloudFixture
from mqtt_starter.simulators.cloud.fixtures import Outcome as AppOutcome
from mqtt_starter.simulators.cloud.server import CloudSimulator
from mqtt_starter.simulators.qrs.fixtures import Fixture, Outcome, TaskFixture
from mqtt_starter.simulators.qrs.server import QrsSimulator
from tests.integration import helpers
from tests.integration.conftest import (
    Broker,
    Client,
    LocalDaemon,
    daemons,
    qrs_section,
    site_config,
)
from tests.integration.helpers import reply

OK = "0f000000-0000-4000-8000-000000000001"
OTHER = "0f000000-0000-4000-8000-000000000002"
FAILS = "0f000000-0000-4000-8000-000000000003"
LONG = "0f000000-0000-4000-8000-000000000004"
MISSING = "0f000000-0000-4000-8000-0000000000ff"
NAMES = {OK: "Orders", OTHER: "Stock", FAILS: "Forecast", LONG: "Customer 360"}
TAGS = {OK: ["Nightly"], OTHER: ["Nightly"], FAILS: ["Fragile"], LONG: ["Weekly"]}
ERROR = "Field 'Amount' not found"


@dataclass
class Site:
    kind: str  # "qrs" | "cloud"
    section: dict[str, Any]  # the daemon's `qrs` or `cloud` configuration
    started: Callable[[], list[str]]  # ids started through the API, in order
    success: str  # the site's name of a successful end
    failure: str
    unsupported: tuple[str, str]  # a topic the site has no equivalent for, and its label


def qrs_fixture() -> Fixture:
    outcomes = {
        OK: Outcome(duration_s=0.1),
        OTHER: Outcome(duration_s=0.1),
        FAILS: Outcome(duration_s=0.1, result="fail", message=ERROR),
        LONG: Outcome(duration_s=30),
    }
    return Fixture(
        tasks=[TaskFixture(id=i, name=NAMES[i], tags=TAGS[i], outcome=outcomes[i]) for i in NAMES]
    )


def cloud_fixture() -> CloudFixture:
    outcomes = {
        OK: AppOutcome(duration_s=0.1),
        OTHER: AppOutcome(duration_s=0.1),
        FAILS: AppOutcome(duration_s=0.1, result="fail", error_code="EDC_ERROR", message=ERROR),
        LONG: AppOutcome(duration_s=30),
    }
    return CloudFixture(
        spaces=["Sales"],
        apps=[
            App(id=i, name=NAMES[i], space="Sales", tags=TAGS[i], outcome=outcomes[i])
            for i in NAMES
        ],
    )


@contextlib.asynccontextmanager
async def open_site(kind: str, certs: CertPaths) -> AsyncIterator[Site]:
    if kind == "qrs":
        qrs = QrsSimulator(qrs_fixture(), certs)
        await qrs.start()
        state = qrs.state
        assert state is not None
        try:
            yield Site(
                "qrs",
                qrs_section(qrs),
                lambda: list(state.started),
                "FinishedSuccess",
                "FinishedFail",
                (f"{helpers.BASE}/start/space/Sales", "space:Sales"),
            )
        finally:
            await qrs.stop()
        return
    cloud = CloudSimulator(cloud_fixture(), certs)
    await cloud.start()
    tenant = cloud.state
    assert tenant is not None
    try:
        yield Site(
            "cloud",
            {
                "tenant_url": cloud.url,
                "api_key": "sim-api-key",
                "ca_file": str(certs.root),
                "poll_interval_s": 0.05,
                "timeout_s": 5,
                "retry": {"attempts": 3, "backoff_s": 0.05, "max_backoff_s": 0.2},
            },
            lambda: list(tenant.started),
            "SUCCEEDED",
            "FAILED",
            (f"{helpers.BASE}/start/cp/group/a", "cp:group=a"),
        )
    finally:
        await cloud.stop()


@pytest.fixture(params=["qrs", "cloud"])
async def site(request: pytest.FixtureRequest, certs: CertPaths) -> AsyncIterator[Site]:
    async with open_site(request.param, certs) as s:
        yield s


@pytest.fixture
async def start_daemon(broker: Broker, site: Site) -> AsyncIterator[Callable[..., Any]]:
    async with daemons(
        LocalDaemon, lambda **sections: site_config(broker, site.kind, site.section, **sections)
    ) as make:
        yield make


def line(task_id: str, matched: list[str], result: str, **extra: Any) -> dict[str, Any]:
    return {"taskId": task_id, "taskName": NAMES[task_id], "matchedBy": matched,
            "result": result, **extra}  # fmt: skip


def execution_of(answer: dict[str, Any], task_id: str) -> str:
    [found] = [t["executionId"] for t in answer["tasks"] if t["taskId"] == task_id]
    assert isinstance(found, str)
    return found


async def test_start_by_id(start_daemon: Any, mqtt: Client, site: Site) -> None:
    await start_daemon()
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{OK}", {"requestId": "r1"})
    assert answer == reply(
        "ok", [line(OK, ["id"], "started", executionId=execution_of(answer, OK))], request_id="r1"
    )
    assert site.started() == [OK]


async def test_start_by_tag_starts_each_tagged_once(
    start_daemon: Any, mqtt: Client, site: Site
) -> None:
    await start_daemon()
    answer = await mqtt.request(f"{helpers.BASE}/start/tag/Nightly", {"names": ["Orders"]})
    assert answer == reply(
        "ok",
        [
            line(OK, ["tag:Nightly", "name"], "started", executionId=execution_of(answer, OK)),
            line(OTHER, ["tag:Nightly"], "started", executionId=execution_of(answer, OTHER)),
        ],
    )
    assert sorted(site.started()) == sorted([OK, OTHER])


async def test_wait_gets_the_finished_reply(start_daemon: Any, mqtt: Client, site: Site) -> None:
    await start_daemon()
    topic = "test/wait"
    await mqtt.subscribe(topic)
    await mqtt.publish(
        f"{helpers.BASE}/start", {"requestId": "w1", "taskIds": [OK, FAILS], "wait": True},
        response_topic=topic,
    )  # fmt: skip
    accepted, finished = await mqtt.wait_for(topic, 2)
    assert accepted.json()["status"] == "ok"
    tasks = {t["taskId"]: t for t in finished.json()["tasks"]}
    assert (finished.json()["stage"], finished.json()["status"]) == ("finished", "partial")
    assert (tasks[OK]["state"], tasks[OK]["stateCode"]) == (site.success, 7)
    assert (tasks[FAILS]["state"], tasks[FAILS]["stateCode"]) == (site.failure, 8)
    assert ERROR in tasks[FAILS]["reason"]
    assert "reason" not in tasks[OK]
    assert all(isinstance(t["durationMs"], int) for t in tasks.values())


async def test_status_events_name_the_request(start_daemon: Any, mqtt: Client, site: Site) -> None:
    await start_daemon()
    await mqtt.subscribe(f"{helpers.BASE}/status/task/+")
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{OK}", {"requestId": "s1"})
    execution_id = execution_of(answer, OK)
    [last] = (
        await mqtt.wait_for(
            f"{helpers.BASE}/status/task/{OK}", until=lambda r: r.json()["stateCode"] == 7
        )
    )[-1:]
    event = last.json()
    assert (event["executionId"], event["requestId"], event["startedBy"], event["state"]) == (
        execution_id,
        "s1",
        "mqtt-starter",
        site.success,
    )


async def test_unknown_and_invalid_ids(start_daemon: Any, mqtt: Client, site: Site) -> None:
    await start_daemon()
    answer = await mqtt.request(f"{helpers.BASE}/start", {"taskIds": [MISSING, "not-a-guid"]})
    assert answer == reply(
        "error",
        [],
        [
            {"selector": f"id:{MISSING}", "reason": "not_found"},
            {"selector": "id:not-a-guid", "reason": "invalid_id"},
        ],
    )
    assert site.started() == []


async def test_dry_run_starts_nothing(start_daemon: Any, mqtt: Client, site: Site) -> None:
    await start_daemon()
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{OK}", {"dryRun": True})
    assert answer == reply("ok", [line(OK, ["id"], "dry_run")])
    assert site.started() == []


async def test_a_repeated_request_id_is_answered_from_memory(
    start_daemon: Any, mqtt: Client, site: Site
) -> None:
    await start_daemon()
    first = await mqtt.request(f"{helpers.BASE}/start/id/{OK}", {"requestId": "same"})
    again = await mqtt.request(f"{helpers.BASE}/start/id/{OK}", {"requestId": "same"})
    assert again == {**first, "replayed": True}
    assert site.started() == [OK]


async def test_a_running_task_is_not_started_again(
    start_daemon: Any, mqtt: Client, site: Site
) -> None:
    await start_daemon()
    first = await mqtt.request(f"{helpers.BASE}/start/id/{LONG}")
    assert first["tasks"][0]["result"] == "started"
    again = await mqtt.request(f"{helpers.BASE}/start/id/{LONG}")
    assert again["status"] == "error"
    assert [t["result"] for t in again["tasks"]] == ["already_running"]
    assert site.started() == [LONG]


async def test_the_allow_list_denies(start_daemon: Any, mqtt: Client, site: Site) -> None:
    await start_daemon(policy={"allow": {"tags": ["Nightly"]}})
    answer = await mqtt.request(f"{helpers.BASE}/start", {"taskIds": [OK, FAILS]})
    assert [(t["taskId"], t["result"]) for t in answer["tasks"]] == [
        (OK, "started"),
        (FAILS, "denied"),
    ]
    assert site.started() == [OK]


async def test_a_selector_the_site_has_no_equivalent_for(
    start_daemon: Any, mqtt: Client, site: Site
) -> None:
    await start_daemon()
    topic, label = site.unsupported
    answer = await mqtt.request(topic, {"taskIds": [OK]})
    assert answer["unmatched"] == [{"selector": label, "reason": "unsupported"}]
    assert (answer["status"], [t["taskId"] for t in answer["tasks"]]) == ("partial", [OK])


async def test_reload_options_are_for_cloud_sites(
    start_daemon: Any, mqtt: Client, site: Site
) -> None:
    await start_daemon()
    answer = await mqtt.request(
        f"{helpers.BASE}/start/id/{OK}", {"partial": True, "weight": 2, "variables": {"v": "x"}}
    )
    if site.kind == "qrs":
        assert answer["error"]["code"] == "bad_payload"
        assert site.started() == []
    else:
        assert answer["tasks"][0]["result"] == "started"
        assert site.started() == [OK]
