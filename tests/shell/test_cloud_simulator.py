"""The Qlik Cloud simulator over real HTTPS, tested from qlik-cloud-api.md (not from the client):
auth, finding apps, starting and following reloads, the pending and rate rules, errors."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.cloud.fixtures import App, CloudFixture, Outcome
from mqtt_starter.simulators.cloud.server import CloudSimulator
from tests.conftest import wait_until

SALES = "0d000000-0000-4000-8000-000000000001"
STOCK_OPS = "0d000000-0000-4000-8000-000000000002"
STOCK_SALES = "0d000000-0000-4000-8000-000000000003"
FORECAST = "0d000000-0000-4000-8000-000000000004"
LOCKED = "0d000000-0000-4000-8000-000000000005"
KEY = "test-key"


def tenant(**options: Any) -> CloudFixture:
    return CloudFixture(
        api_keys=[KEY],
        spaces=["Sales", "Operations"],
        apps=[
            App(id=SALES, name="Sales Dashboard", space="Sales", tags=["Nightly"],
                outcome=Outcome(duration_s=0.05)),
            App(id=STOCK_OPS, name="Stock Levels", space="Operations", tags=["Nightly"],
                outcome=Outcome(duration_s=0.05)),
            App(id=STOCK_SALES, name="Stock Levels", space="Sales",
                outcome=Outcome(duration_s=0.05)),
            App(id=FORECAST, name="Forecast", tags=["nightly"], outcome=Outcome(
                duration_s=0.05, result="fail", error_code="EDC_ERROR_SCRIPT",
                message="Field 'Amount' not found", log_lines=50)),
            App(id=LOCKED, name="Locked", reloadable=False),
        ],
        **options,
    )  # fmt: skip


class Api:
    def __init__(self, sim: CloudSimulator, session: aiohttp.ClientSession) -> None:
        self.sim = sim
        self.session = session

    async def __call__(
        self, method: str, path: str, *, bearer: str | None = KEY, body: Any = None, **query: Any
    ) -> tuple[int, Any, dict[str, str]]:
        headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
        async with self.session.request(
            method, self.sim.url + path, headers=headers, json=body, params=query or None
        ) as response:
            if response.content_type == "application/json":
                data: Any = await response.json()
            else:
                data = await response.text()
            return response.status, data, dict(response.headers)


@contextlib.asynccontextmanager
async def open_api(certs: CertPaths, fixture: CloudFixture) -> AsyncIterator[Api]:
    sim = CloudSimulator(fixture, certs)
    await sim.start()
    context = ssl.create_default_context(cafile=str(certs.root))
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
            yield Api(sim, session)
    finally:
        await sim.stop()


@pytest.fixture
async def api(certs: CertPaths) -> AsyncIterator[Api]:
    async with open_api(certs, tenant()) as a:
        yield a


def names(data: dict[str, Any]) -> list[str]:
    return [i["name"] for i in data["data"]]


async def finished(api: Api, reload_id: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def ended() -> bool:
        _, reload, _ = await api("GET", f"/api/v1/reloads/{reload_id}")
        found.update(reload)
        return reload["status"] not in ("QUEUED", "RELOADING", "CANCELING")

    await wait_until(ended, what=f"reload {reload_id} to end")
    return found


# -- auth ---------------------------------------------------------------------------------------


async def test_without_a_valid_bearer_the_api_answers_401(api: Api) -> None:
    for bearer in (None, "wrong"):
        status, body, _ = await api("GET", "/api/v1/items", bearer=bearer)
        assert status == 401
        assert body["errors"][0]["code"] == "HTTP-401"
    assert (await api("GET", "/api/v1/items"))[0] == 200


async def test_oauth_client_credentials_and_expiring_tokens(certs: CertPaths) -> None:
    async with open_api(certs, tenant(token_lifetime_s=0.3)) as api:
        body = {
            "client_id": "sim-client",
            "client_secret": "wrong",
            "scope": "user_default",
            "grant_type": "client_credentials",
        }
        status, refused, _ = await api("POST", "/oauth/token", bearer=None, body=body)
        assert status == 401 and refused["errors"][0]["title"] == "invalid_client"
        body["client_secret"] = "sim-secret"
        status, granted, _ = await api("POST", "/oauth/token", bearer=None, body=body)
        assert status == 200
        assert (granted["token_type"], granted["expires_in"]) == ("Bearer", 0.3)
        token = granted["access_token"]
        assert (await api("GET", "/api/v1/items", bearer=token))[0] == 200

        async def expired() -> bool:
            return (await api("GET", "/api/v1/items", bearer=token))[0] == 401

        await wait_until(expired, what="the token to expire")
        # Without a scope the token is issued, but reaches nothing (qlik-cloud-api.md).
        del body["scope"]
        status, scopeless, _ = await api("POST", "/oauth/token", bearer=None, body=body)
        assert status == 200
        status, refused, _ = await api("GET", "/api/v1/items", bearer=scopeless["access_token"])
        assert (status, refused["errors"][0]["code"]) == (403, "HTTP-403")


# -- finding apps --------------------------------------------------------------------------------


async def test_items_by_name_match_loosely_and_by_resource_ids_exactly(api: Api) -> None:
    _, found, _ = await api("GET", "/api/v1/items", resourceType="app", name="stock levels")
    assert names(found) == ["Stock Levels", "Stock Levels"]
    assert {i["resourceId"] for i in found["data"]} == {STOCK_OPS, STOCK_SALES}
    _, loose, _ = await api("GET", "/api/v1/items", resourceType="app", name="STOCK")
    assert len(loose["data"]) == 2  # not exact: callers compare names themselves
    _, by_ids, _ = await api(
        "GET", "/api/v1/items", resourceType="app", resourceIds=f"{SALES},{FORECAST}"
    )
    assert sorted(i["resourceId"] for i in by_ids["data"]) == sorted([SALES, FORECAST])
    item = by_ids["data"][0]
    assert item["id"] != item["resourceId"]  # an item has an id of its own


async def test_tags_are_public_collections_and_spaces_have_ids(api: Api) -> None:
    _, tags, _ = await api("GET", "/api/v1/collections", type="public", name="Nightly")
    [nightly] = tags["data"]
    _, lower, _ = await api("GET", "/api/v1/collections", type="public", name="nightly")
    [other] = lower["data"]  # names are case-sensitive: another collection
    assert other["id"] != nightly["id"]
    _, tagged, _ = await api("GET", "/api/v1/items", resourceType="app", collectionId=nightly["id"])
    assert sorted(i["resourceId"] for i in tagged["data"]) == sorted([SALES, STOCK_OPS])
    _, space, _ = await api("GET", "/api/v1/spaces", name="Sales")
    [sales] = space["data"]
    _, in_space, _ = await api("GET", "/api/v1/items", resourceType="app", spaceId=sales["id"])
    assert sorted(i["resourceId"] for i in in_space["data"]) == sorted([SALES, STOCK_SALES])


async def test_lists_page_with_a_cursor(api: Api) -> None:
    _, first, _ = await api("GET", "/api/v1/items", resourceType="app", limit="2")
    assert len(first["data"]) == 2
    seen = [i["resourceId"] for i in first["data"]]
    href = first["links"]["next"]["href"]
    while href:
        async with api.session.get(href, headers={"Authorization": f"Bearer {KEY}"}) as response:
            page = await response.json()
        seen += [i["resourceId"] for i in page["data"]]
        href = page["links"].get("next", {}).get("href")
    assert sorted(seen) == sorted([SALES, STOCK_OPS, STOCK_SALES, FORECAST, LOCKED])
    status, body, _ = await api("GET", "/api/v1/items", limit="101")
    assert status == 400 and body["errors"][0]["code"] == "HTTP-400"


# -- reloads -------------------------------------------------------------------------------------


async def test_a_reload_runs_through_its_states(api: Api) -> None:
    status, reload, _ = await api(
        "POST", "/api/v1/reloads", body={"appId": SALES, "partial": True, "weight": 3}
    )
    assert status == 201
    assert (reload["status"], reload["appId"], reload["partial"], reload["weight"]) == (
        "QUEUED",
        SALES,
        True,
        3,
    )
    assert len(reload["id"]) == 24
    ended = await finished(api, reload["id"])
    assert ended["status"] == "SUCCEEDED"
    assert ended["creationTime"] <= ended["startTime"] <= ended["endTime"]


async def test_a_failed_reload_has_its_error_and_its_log(api: Api) -> None:
    _, reload, _ = await api("POST", "/api/v1/reloads", body={"appId": FORECAST})
    early = await api("GET", f"/api/v1/apps/{FORECAST}/reloads/logs/{reload['id']}")
    assert early[0] == 404  # no log before the end
    ended = await finished(api, reload["id"])
    assert (ended["status"], ended["errorCode"], ended["errorMessage"]) == (
        "FAILED",
        "EDC_ERROR_SCRIPT",
        "Field 'Amount' not found",
    )
    status, log, _ = await api("GET", f"/api/v1/apps/{FORECAST}/reloads/logs/{reload['id']}")
    assert status == 200
    lines = log.splitlines()
    assert len(lines) == 54
    assert [line[20:] for line in lines[-3:]] == [
        "Error: Field 'Amount' not found",
        "Execution Failed",
        "Execution finished.",
    ]
    assert ended["log"] == lines[-2]  # the short summary; the full log is its own call
    assert (await api("GET", f"/api/v1/apps/{SALES}/reloads/logs/{reload['id']}"))[0] == 404


async def test_one_queued_reload_per_app(api: Api) -> None:
    # "Qlik keeps one queued reload per app": one asked for while another reloads waits its
    # turn; one more while that one waits is refused.
    _, first, _ = await api("POST", "/api/v1/reloads", body={"appId": SALES})

    async def reloading() -> bool:
        reload = (await api("GET", f"/api/v1/reloads/{first['id']}"))[1]
        return bool(reload["status"] == "RELOADING")

    await wait_until(reloading, what="the first reload to run")
    status, queued, _ = await api("POST", "/api/v1/reloads", body={"appId": SALES})
    assert (status, queued["status"]) == (201, "QUEUED")
    status, body, headers = await api("POST", "/api/v1/reloads", body={"appId": SALES})
    assert status == 429
    assert body["errors"][0]["code"] != "HTTP-429"  # not the rate limit
    assert "pending reload" in body["errors"][0]["detail"]
    assert "Retry-After" not in headers
    ended_first = await finished(api, first["id"])
    ended_queued = await finished(api, queued["id"])
    # The queued one reloaded only after the first had ended.
    assert ended_first["endTime"] <= ended_queued["startTime"]
    assert (await api("POST", "/api/v1/reloads", body={"appId": SALES}))[0] == 201


async def test_the_reload_rate_limit_answers_retry_after(certs: CertPaths) -> None:
    async with open_api(certs, tenant(reload_limit=2, reload_window_s=60)) as api:
        assert (await api("POST", "/api/v1/reloads", body={"appId": SALES}))[0] == 201
        assert (await api("POST", "/api/v1/reloads", body={"appId": STOCK_OPS}))[0] == 201
        status, body, headers = await api("POST", "/api/v1/reloads", body={"appId": STOCK_SALES})
        assert status == 429
        assert body["errors"][0] == {
            "code": "HTTP-429",
            "title": "API rate limit reached.",
            "detail": "at most 2 reloads per 60 s",
        }
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert api.sim.state is not None and api.sim.state.started == [SALES, STOCK_OPS]


async def test_refusals_are_403_with_a_reloads_code(certs: CertPaths) -> None:
    async with open_api(certs, tenant(reload_quota=1)) as api:
        status, body, _ = await api("POST", "/api/v1/reloads", body={"appId": LOCKED})
        assert (status, body["errors"][0]["code"]) == (403, "RELOADS-003")
        assert (await api("POST", "/api/v1/reloads", body={"appId": SALES}))[0] == 201
        status, body, _ = await api("POST", "/api/v1/reloads", body={"appId": STOCK_OPS})
        assert (status, body["errors"][0]["code"]) == (403, "RELOADS-013")
        status, body, _ = await api(
            "POST", "/api/v1/reloads", body={"appId": "0d000000-0000-4000-8000-0000000000ff"}
        )
        assert status == 404


async def test_bad_reload_options_are_refused(api: Api) -> None:
    too_many = {f"v{i}": "x" for i in range(21)}
    for body in (
        {"appId": SALES, "weight": 11},
        {"appId": SALES, "variables": too_many},
        {"appId": SALES, "variables": {"v": "x" * 257}},
        {"partial": True},
    ):
        assert (await api("POST", "/api/v1/reloads", body=body))[0] == 400, body


async def test_an_apps_reloads_newest_first_and_by_status(api: Api) -> None:
    _, failed, _ = await api("POST", "/api/v1/reloads", body={"appId": FORECAST})
    await finished(api, failed["id"])
    _, second, _ = await api("POST", "/api/v1/reloads", body={"appId": FORECAST})
    await finished(api, second["id"])
    _, listed, _ = await api("GET", "/api/v1/reloads", appId=FORECAST, limit="10")
    assert [r["id"] for r in listed["data"]] == [second["id"], failed["id"]]
    _, only, _ = await api(
        "GET", "/api/v1/reloads", appId=FORECAST, filter='(status eq "SUCCEEDED")'
    )
    assert only["data"] == []
    assert (await api("GET", "/api/v1/reloads"))[0] == 400  # appId is required


async def test_cancel(api: Api) -> None:
    fixture = tenant()
    fixture.apps[0].outcome.duration_s = 30
    async with open_api(api.sim.certs, fixture) as slow:
        _, reload, _ = await slow("POST", "/api/v1/reloads", body={"appId": SALES})
        assert (await slow("POST", f"/api/v1/reloads/{reload['id']}/actions/cancel"))[0] == 202
        assert (await finished(slow, reload["id"]))["status"] == "CANCELED"
        status, _, _ = await slow("POST", f"/api/v1/reloads/{reload['id']}/actions/cancel")
        assert status == 409


async def test_reload_tasks_are_gone(api: Api) -> None:
    assert (await api("POST", "/api/v1/reload-tasks", body={}))[0] == 410


async def test_journal_and_faults(api: Api) -> None:
    async with api.session.post(
        api.sim.url + "/_sim/faults", json={"failNext": 1, "pathContains": "/reloads"}
    ) as response:
        assert response.status == 200
    assert (await api("GET", "/api/v1/items"))[0] == 200
    status, body, _ = await api("POST", "/api/v1/reloads", body={"appId": SALES})
    assert (status, body["errors"][0]["code"]) == (503, "HTTP-503")
    assert (await api("POST", "/api/v1/reloads", body={"appId": SALES}))[0] == 201
    async with api.session.get(api.sim.url + "/_sim/journal") as response:
        journal = await response.json()
    assert [(e["method"], e["path"], e["status"]) for e in journal["entries"]] == [
        ("GET", "/api/v1/items", 200),
        ("POST", "/api/v1/reloads", 503),
        ("POST", "/api/v1/reloads", 201),
    ]
    assert journal["started"] == [SALES]
