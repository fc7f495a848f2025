"""Every answer qlik-cloud-api.md leaves open, the Cloud simulator set to give it, the client
against it: the OAuth scope, one token request for many 401s, what a 429 is, bounded waits, a
log that answers 404 just after the end, a lost start matched only to an API reload, and an
app's tags read from its item."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mqtt_starter.config import CloudSettings, RetrySettings
from mqtt_starter.core.errors import ConfigError
from mqtt_starter.core.model import Selector, SelectorKind, TaskRef, TaskResult, TaskStatus
from mqtt_starter.service.follow import Tracker
from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.cloud.fixtures import CloudVariants
from mqtt_starter.sites.base import resolve_selectors
from mqtt_starter.sites.cloud import CloudClient
from tests.conftest import wait_until
from tests.shell.test_cloud_client import FAILS, A, B, calls, site, tenant

OAUTH: dict[str, Any] = {
    "auth": "oauth",
    "api_key": None,
    "client_id": "sim-client",
    "client_secret": "sim-secret",
}


async def test_the_oauth_scope_is_sent(certs: CertPaths) -> None:
    async with site(certs, **OAUTH, scope="user_default admin.apps") as (client, state):
        await client.about()
        assert state.tokens_issued == 1 and state.scopeless == set()
        assert [c for c in calls(state) if c[1] == "/api/v1/items"] == [
            ("GET", "/api/v1/items", 200)
        ]


async def test_twenty_concurrent_401s_make_one_token_request(certs: CertPaths) -> None:
    async with site(certs, **OAUTH) as (client, state):
        await client.about()
        assert state.tokens_issued == 1
        state.tokens.clear()  # revoked (or expired early): every call now gets a 401
        state.faults.open.clear()  # hold the calls so that all twenty are refused at once
        calls_made = asyncio.gather(*(client.about() for _ in range(20)))
        await wait_until(  # max_concurrency (8) calls are in flight, held
            lambda: sum(1 for e in state.journal if e.path == "/api/v1/items") == 1 + 8,
            what="eight calls in flight",
        )
        state.faults.open.set()
        await calls_made
        assert state.tokens_issued == 2
        statuses = [s for _, p, s in calls(state) if p == "/api/v1/items"]
        assert statuses.count(200) == 21 and set(statuses) <= {200, 401}


async def test_a_rate_limit_is_waited_out_only_within_the_bound(certs: CertPaths) -> None:
    fixture = tenant(reload_limit=1, reload_window_s=60)
    retry = RetrySettings(attempts=3, backoff_s=0.01, max_backoff_s=0.5)
    async with site(certs, fixture, retry=retry) as (client, state):
        assert (await client.start_task(TaskRef(id=A, name="Orders"))).result is TaskResult.STARTED
        held = await client.start_task(TaskRef(id=B, name="Orders"))
        assert held.result is TaskResult.FAILED
        assert held.error is not None and held.error.startswith(
            "Qlik Cloud's rate limit held the reload back past cloud.retry.max_backoff_s (0.5 s)"
        )
        # Retry-After is 60 s: more than the bound, so it was not waited at all.
        assert [s for m, p, s in calls(state) if m == "POST"] == [201, 429]


async def test_a_429_from_a_proxy_is_neither_a_rate_limit_nor_pending(certs: CertPaths) -> None:
    async with site(certs) as (client, state):
        state.variants = CloudVariants(proxy_429_next=1)
        refused = await client.start_task(TaskRef(id=A, name="Orders"))
        assert refused.result is TaskResult.FAILED
        assert refused.error is not None and "neither Qlik's rate limit nor a pending" in (
            refused.error
        )
        assert state.started == []
        assert (await client.start_task(TaskRef(id=A, name="Orders"))).result is (
            TaskResult.STARTED
        )


@pytest.mark.parametrize("late_reads", [0, 2])
async def test_a_log_that_answers_404_just_after_the_end_is_read_again(
    certs: CertPaths, late_reads: int
) -> None:
    # The waits are Butler's (0.5 s, then 2 s); here none, so that the test does not wait.
    async with site(certs, log_retry_s=(0.0, 0.0, 0.0)) as (client, state):
        state.variants = CloudVariants(log_ready_after_reads=late_reads)
        task = TaskRef(id=FAILS, name="Forecast")
        started = await client.start_task(task)
        assert started.execution_id is not None
        end = await Tracker(client, 0.02).follow(task, started.execution_id, timeout_s=30)
        assert end.last is not None and end.last.status is TaskStatus.FINISHED_FAIL
        log = state.logs[started.execution_id].splitlines()
        assert end.last.reason == "\n".join(["EDC_ERROR: Table not found", *log[-30:]])
        reads = [s for _, p, s in calls(state) if "/reloads/logs/" in p]
        assert reads == [404] * late_reads + [200]


async def test_a_lost_start_is_matched_only_to_a_reload_of_the_api(certs: CertPaths) -> None:
    async with site(certs) as (client, state):
        # The POST fails without reaching the tenant; meanwhile a user reloads the app in the
        # hub. That reload began after the start was sent, but it is not ours.
        state.faults.fail_next = 1
        state.faults.path_contains = "/api/v1/reloads"
        state.faults.open.clear()
        start = asyncio.create_task(client.start_task(TaskRef(id=B, name="Orders")))
        await wait_until(lambda: any(e.method == "POST" for e in state.journal), what="the POST")
        hub = state.start_reload(B, kind="hub")
        state.faults.open.set()
        started = await start
        assert started.result is TaskResult.UNKNOWN
        assert started.execution_id is None and hub["type"] == "hub"
        assert [c for c in calls(state) if c[1] == "/api/v1/reloads"] == [
            ("POST", "/api/v1/reloads", 503),
            ("GET", "/api/v1/reloads", 200),
        ]
        # A start whose answer is lost after the tenant carried it out finds its own reload.
        state.faults.lose_next, state.faults.lose_as = 1, "503"
        found = await client.start_task(TaskRef(id=A, name="Orders"))
        [ours] = [r for r in state.reloads.values() if r["appId"] == A]
        assert (found.result, found.execution_id, ours["type"]) == (
            TaskResult.STARTED,
            ours["id"],
            "external",
        )


async def test_tags_are_read_from_the_item_not_one_query_per_tag(certs: CertPaths) -> None:
    async with site(certs) as (client, state):
        resolution = await resolve_selectors(client, [Selector(SelectorKind.ID, A)])
        [found] = resolution.tasks
        assert found.task.tags == ("Nightly",)
        assert [p for _, p, _ in calls(state) if p == "/api/v1/collections"] == []


async def test_a_corrupt_ca_file_is_a_configuration_error_naming_it(
    certs: CertPaths, tmp_path: Any
) -> None:
    corrupt = tmp_path / "ca.pem"
    corrupt.write_text(
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    settings = CloudSettings.model_validate(
        {"tenant_url": "https://tenant.example", "api_key": "k", "ca_file": corrupt}
    )
    client = CloudClient(settings)
    with pytest.raises(ConfigError) as info:
        await client.start()
    [problem] = info.value.problems
    assert problem.path == "cloud.ca_file"
    assert str(corrupt) in problem.message
