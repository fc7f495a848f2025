"""What only a Qlik Cloud site does, through the Cloud simulator and a real broker: spaces and
tags across them, names shared by two apps, pending and refused reloads, a failure's reason,
an OAuth token that expires during a run of requests, and a burst against the rate limit."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.cloud.fixtures import App, CloudFixture, Outcome
from mqtt_starter.simulators.cloud.server import CloudSimulator
from mqtt_starter.simulators.cloud.state import CloudState
from tests.conftest import wait_until
from tests.integration import helpers
from tests.integration.conftest import Broker, Client, LocalDaemon, daemons, site_config

SALES_ORDERS = "1a000000-0000-4000-8000-000000000001"
OPS_ORDERS = "1a000000-0000-4000-8000-000000000002"
STOCK = "1a000000-0000-4000-8000-000000000003"
FORECAST = "1a000000-0000-4000-8000-000000000004"
LOCKED = "1a000000-0000-4000-8000-000000000005"
QUICK = Outcome(duration_s=0.1)


def burst_ids(count: int) -> list[str]:
    return [f"1b000000-0000-4000-8000-{i:012d}" for i in range(count)]


def tenant(**options: Any) -> CloudFixture:
    apps = [
        App(id=SALES_ORDERS, name="Orders", space="Sales", tags=["Nightly"], outcome=QUICK),
        App(id=OPS_ORDERS, name="Orders", space="Ops", tags=["Nightly"], outcome=QUICK),
        App(id=STOCK, name="Stock", space="Ops", outcome=Outcome(duration_s=30)),
        App(id=FORECAST, name="Forecast", tags=["Fragile"], outcome=Outcome(
            duration_s=0.1, result="fail", error_code="EDC_ERROR_SCRIPT",
            message="Field 'Amount' not found", log_lines=40)),
        App(id=LOCKED, name="Locked", reloadable=False),
        *(App(id=i, name=f"Burst {n:03d}", tags=["Burst"], outcome=QUICK)
          for n, i in enumerate(burst_ids(120))),
    ]  # fmt: skip
    return CloudFixture(spaces=["Sales", "Ops"], apps=apps, **options)


@contextlib.asynccontextmanager
async def tenant_and_daemons(
    certs: CertPaths, broker: Broker, fixture: CloudFixture, **cloud: Any
) -> AsyncIterator[tuple[CloudState, Callable[..., Any]]]:
    sim = CloudSimulator(fixture, certs)
    await sim.start()
    assert sim.state is not None
    section = {
        "tenant_url": sim.url,
        "api_key": "sim-api-key",
        "ca_file": str(certs.root),
        "poll_interval_s": 0.05,
        "timeout_s": 5,
        "retry": {"attempts": 3, "backoff_s": 0.05, "max_backoff_s": 0.2},
        **cloud,
    }
    try:
        async with daemons(
            LocalDaemon, lambda **sections: site_config(broker, "cloud", section, **sections)
        ) as make:
            yield sim.state, make
    finally:
        await sim.stop()


@pytest.fixture
async def cloud(
    certs: CertPaths, broker: Broker
) -> AsyncIterator[tuple[CloudState, Callable[..., Any]]]:
    async with tenant_and_daemons(certs, broker, tenant()) as made:
        yield made


def results(answer: dict[str, Any]) -> list[tuple[str, list[str], str]]:
    return [(t["taskId"], t["matchedBy"], t["result"]) for t in answer["tasks"]]


async def test_each_selector(cloud: tuple[CloudState, Any], mqtt: Client) -> None:
    state, make = cloud
    await make()
    by_tag = await mqtt.request(f"{helpers.BASE}/start/tag/Nightly")  # apps in two spaces
    assert results(by_tag) == [
        (SALES_ORDERS, ["tag:Nightly"], "started"),
        (OPS_ORDERS, ["tag:Nightly"], "started"),
    ]
    by_space = await mqtt.request(f"{helpers.BASE}/start/space/Ops", {"requestId": "space"})
    assert results(by_space) == [
        (OPS_ORDERS, ["space:Ops"], "already_running"),
        (STOCK, ["space:Ops"], "started"),
    ]
    by_id = await mqtt.request(f"{helpers.BASE}/start/id/{FORECAST}")
    assert results(by_id) == [(FORECAST, ["id"], "started")]
    assert state.started == [SALES_ORDERS, OPS_ORDERS, STOCK, FORECAST]


async def test_a_name_shared_by_two_apps_starts_both(
    cloud: tuple[CloudState, Any], mqtt: Client
) -> None:
    state, make = cloud
    await make()
    answer = await mqtt.request(f"{helpers.BASE}/start/name/Orders")
    assert results(answer) == [
        (SALES_ORDERS, ["name"], "started"),
        (OPS_ORDERS, ["name"], "started"),
    ]
    assert answer["status"] == "ok"
    assert state.started == [SALES_ORDERS, OPS_ORDERS]


async def test_running_and_refused_reloads(cloud: tuple[CloudState, Any], mqtt: Client) -> None:
    state, make = cloud
    await make()
    await mqtt.request(f"{helpers.BASE}/start/id/{STOCK}")
    # The app's newest reload says it runs: not started again (policy.on_running: skip).
    answer = await mqtt.request(f"{helpers.BASE}/start", {"taskIds": [STOCK, LOCKED]})
    assert answer["tasks"] == [
        {"taskId": STOCK, "taskName": "Stock", "matchedBy": ["id"], "result": "already_running"},
        {
            "taskId": LOCKED,
            "taskName": "Locked",
            "matchedBy": ["id"],
            "result": "failed",
            "error": "Qlik Cloud refused the reload: HTTP 403 RELOADS-003 Not allowed: you may"
            " not reload this app",
        },
    ]
    assert answer["status"] == "error"
    assert state.started == [STOCK]


async def test_on_running_start_queues_one_reload_and_qlik_refuses_a_second(
    cloud: tuple[CloudState, Any], mqtt: Client
) -> None:
    state, make = cloud
    await make(policy={"on_running": "start"})
    first = await mqtt.request(f"{helpers.BASE}/start/id/{STOCK}")
    queued = await mqtt.request(f"{helpers.BASE}/start/id/{STOCK}")
    refused = await mqtt.request(f"{helpers.BASE}/start/id/{STOCK}")
    assert [r["tasks"][0]["result"] for r in (first, queued, refused)] == [
        "started",
        "started",
        "already_running",
    ]
    assert refused["tasks"][0]["error"] == (
        "Too many requests: a pending reload request already exists for this app"
    )
    assert state.started == [STOCK, STOCK]
    assert state.reloads[queued["tasks"][0]["executionId"]]["status"] == "QUEUED"


async def test_a_failing_reload_with_its_reason(
    cloud: tuple[CloudState, Any], mqtt: Client
) -> None:
    state, make = cloud
    await make()
    topic = "test/cloud-wait"
    await mqtt.subscribe(topic, f"{helpers.BASE}/status/task/+")
    await mqtt.publish(
        f"{helpers.BASE}/start/id/{FORECAST}",
        {"requestId": "f1", "wait": True},
        response_topic=topic,
    )
    accepted, finished = await mqtt.wait_for(topic, 2)
    reload_id = accepted.json()["tasks"][0]["executionId"]
    log = state.logs[reload_id].splitlines()
    reload = state.reloads[reload_id]
    [task] = finished.json()["tasks"]
    assert task == {
        "taskId": FORECAST,
        "taskName": "Forecast",
        "matchedBy": ["id"],
        "result": "started",
        "executionId": reload_id,
        "state": "FAILED",
        "stateCode": 8,
        "durationMs": task["durationMs"],
        "reason": "\n".join(["EDC_ERROR_SCRIPT: Field 'Amount' not found", *log[-30:]]),
    }
    assert (finished.json()["status"], reload["status"]) == ("error", "FAILED")
    events = [e.json() for e in mqtt.on(f"{helpers.BASE}/status/task/{FORECAST}")]
    assert events[-1]["state"] == "FAILED" and events[-1]["stateCode"] == 8
    assert events[-1]["message"] == "Field 'Amount' not found"


async def test_an_oauth_token_that_expires_during_a_run_of_requests(
    certs: CertPaths, broker: Broker, mqtt: Client
) -> None:
    cloud = {"auth": "oauth", "api_key": None, "client_id": "sim-client",
             "client_secret": "sim-secret"}  # fmt: skip
    async with tenant_and_daemons(certs, broker, tenant(token_lifetime_s=3.0), **cloud) as (
        state,
        make,
    ):
        await make()
        answers = []

        async def renewed() -> bool:
            answers.append(
                await mqtt.request(f"{helpers.BASE}/start/id/{SALES_ORDERS}", {"dryRun": True})
            )
            return state.tokens_issued == 2

        await wait_until(renewed, what="the token to be renewed")
        for _ in range(3):
            answers.append(
                await mqtt.request(f"{helpers.BASE}/start/id/{OPS_ORDERS}", {"dryRun": True})
            )
        assert {a["status"] for a in answers} == {"ok"}
        assert state.tokens_issued == 2  # refreshed once, before it expired
        assert [e.status for e in state.journal if e.status == 401] == []


async def test_a_burst_of_120_against_the_rate_limit(
    certs: CertPaths, broker: Broker, mqtt: Client
) -> None:
    # A window of 3 s, not a minute: long enough that 50 starts fit into it on a loaded
    # machine (so the limit is hit), short enough for a test.
    fixture = tenant(reload_limit=50, reload_window_s=3.0)
    # Rate-limit waits are bounded by retry.max_backoff_s in all: room for a few windows.
    retry = {"attempts": 3, "backoff_s": 0.05, "max_backoff_s": 30}
    async with tenant_and_daemons(
        certs, broker, fixture, max_starts_per_minute=100_000, retry=retry
    ) as (
        state,
        make,
    ):
        await make(policy={"max_tasks_per_request": 200})
        answer = await mqtt.request(f"{helpers.BASE}/start/tag/Burst", {"requestId": "burst"})
        assert [t["result"] for t in answer["tasks"]] == ["started"] * 120
        assert answer["status"] == "ok"
        # In order, none dropped: the tenant saw the reloads in the order of the reply.
        assert state.started == [t["taskId"] for t in answer["tasks"]] == burst_ids(120)
        posts = [e.status for e in state.journal if e.method == "POST"]
        assert posts.count(201) == 120
        assert posts.count(429) >= 1
        assert set(posts) == {201, 429}
        # Every 429 was waited out and the same start repeated: the last call is a 201.
        assert posts[-1] == 201
        waited = [t.get("waitedMs", 0) for t in answer["tasks"]]
        assert waited[:50] == [0] * 50 and all(w > 0 for w in waited[100:])


async def test_the_allow_list_works_on_apps_tags_and_spaces(
    cloud: tuple[CloudState, Any], mqtt: Client
) -> None:
    state, make = cloud
    await make(policy={"allow": {"spaces": ["Sales"], "tags": ["Fragile"]}})
    answer = await mqtt.request(
        f"{helpers.BASE}/start", {"names": ["Orders"], "taskIds": [FORECAST]}
    )
    assert results(answer) == [
        (FORECAST, ["id"], "started"),  # by its tag, although found by id
        (SALES_ORDERS, ["name"], "started"),  # by its space
        (OPS_ORDERS, ["name"], "denied"),
    ]
    assert state.started == [FORECAST, SALES_ORDERS]


async def test_the_status_page_shows_a_cloud_site(
    cloud: tuple[CloudState, Any], mqtt: Client
) -> None:
    import aiohttp

    from tests.conftest import free_port

    _, make = cloud
    port = free_port()
    await make(http={"enabled": True, "port": port})
    await mqtt.request(f"{helpers.BASE}/start/id/{FORECAST}", {"requestId": "page"})
    async with aiohttp.ClientSession() as session:

        async def ended() -> bool:
            async with session.get(f"http://127.0.0.1:{port}/status.json") as response:
                snapshot = await response.json()
            return [r["stage"] for r in snapshot["requests"]] == ["finished"]

        await wait_until(ended, what="the reload to end on the page")
        async with session.get(f"http://127.0.0.1:{port}/status.json") as response:
            snapshot = await response.json()
    instance = snapshot["instance"]
    assert (instance["backend"], instance["siteReachable"]) == ("cloud", True)
    assert instance["siteUrl"].startswith("https://127.0.0.1:")
    [request] = snapshot["requests"]
    assert request["reply"]["tasks"][0]["state"] == "FAILED"  # its finished state
