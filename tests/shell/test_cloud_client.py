"""The Qlik Cloud client against the Cloud simulator over real HTTPS, asserting the exact calls."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mqtt_starter.config import CloudSettings, RetrySettings
from mqtt_starter.core.errors import QrsAuthError
from mqtt_starter.core.model import (
    ReloadOptions,
    Selector,
    SelectorKind,
    TaskRef,
    TaskResult,
    TaskStatus,
    UnmatchedReason,
)
from mqtt_starter.service.follow import Tracker
from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.cloud.fixtures import App, CloudFixture, Outcome
from mqtt_starter.simulators.cloud.server import CloudSimulator
from mqtt_starter.simulators.cloud.state import CloudState
from mqtt_starter.sites.base import resolve_selectors
from mqtt_starter.sites.cloud import CloudClient
from tests.conftest import wait_until

A = "0e000000-0000-4000-8000-000000000001"
B = "0e000000-0000-4000-8000-000000000002"
C = "0e000000-0000-4000-8000-000000000003"
FAILS = "0e000000-0000-4000-8000-000000000004"


QUICK = Outcome(duration_s=0.05)


def tenant(**options: Any) -> CloudFixture:
    return CloudFixture(
        spaces=["Sales", "Ops"],
        apps=[
            App(id=A, name="Orders", space="Sales", tags=["Nightly"], outcome=QUICK),
            App(id=B, name="Orders", space="Ops", tags=["Nightly"], outcome=QUICK),
            App(id=C, name="Stock", space="Ops", outcome=QUICK),
            App(id=FAILS, name="Forecast", tags=["Fragile"], outcome=Outcome(
                duration_s=0.05, result="fail", error_code="EDC_ERROR", message="Table not found",
                log_lines=40)),
        ],
        **options,
    )  # fmt: skip


def settings(sim: CloudSimulator, **overrides: Any) -> CloudSettings:
    values: dict[str, Any] = {
        "tenant_url": sim.url,
        "api_key": "sim-api-key",
        "ca_file": sim.certs.root,
        "timeout_s": 5,
        "poll_interval_s": 0.05,
        "retry": RetrySettings(attempts=3, backoff_s=0.01, max_backoff_s=0.05),
    }
    values.update(overrides)
    return CloudSettings.model_validate(values)


@contextlib.asynccontextmanager
async def site(
    certs: CertPaths, fixture: CloudFixture | None = None, **options: Any
) -> AsyncIterator[tuple[CloudClient, CloudState]]:
    sim = CloudSimulator(fixture or tenant(), certs)
    await sim.start()
    assert sim.state is not None
    client_options = {k: options.pop(k) for k in ("rate_window_s", "log_retry_s") if k in options}
    client = CloudClient(settings(sim, **options), **client_options)
    await client.start()
    try:
        yield client, sim.state
    finally:
        await client.close()
        await sim.stop()


def calls(state: CloudState) -> list[tuple[str, str, int]]:
    return [(e.method, e.path, e.status) for e in state.journal]


async def test_selectors_find_apps_across_spaces(certs: CertPaths) -> None:
    async with site(certs) as (client, state):
        resolution = await resolve_selectors(
            client,
            [
                Selector(SelectorKind.TAG, "Nightly"),
                Selector(SelectorKind.NAME, "orders"),
                Selector(SelectorKind.SPACE, "Ops"),
                Selector(SelectorKind.ID, FAILS),
                Selector(SelectorKind.CUSTOM_PROPERTY, "x", name="group"),
            ],
        )
        found = {
            r.task.id: ([s.label for s in r.matched_by], r.task.space) for r in resolution.tasks
        }
        assert found == {
            A: (["tag:Nightly", "name:orders"], "Sales"),
            B: (["tag:Nightly", "name:orders", "space:Ops"], "Ops"),
            C: (["space:Ops"], "Ops"),
            FAILS: (["id:" + FAILS], ""),
        }
        assert [(u.selector.label, u.reason) for u in resolution.unmatched] == [
            ("cp:group=x", UnmatchedReason.UNSUPPORTED)
        ]
        # Nothing was started; each app's newest reload was read once, for its state.
        assert [m for m, _, _ in calls(state) if m != "GET"] == []
        reads = [e.query["appId"] for e in state.journal if e.path == "/api/v1/reloads"]
        assert sorted(reads) == sorted([A, B, C, FAILS])


async def test_an_unknown_tag_name_or_space_matches_nothing(certs: CertPaths) -> None:
    async with site(certs) as (client, _):
        resolution = await resolve_selectors(
            client,
            [
                Selector(SelectorKind.TAG, "nightly"),  # collection names are case-sensitive
                Selector(SelectorKind.NAME, "Ord"),  # the API matches loosely; we do not
                Selector(SelectorKind.SPACE, "Nowhere"),
            ],
        )
        assert resolution.tasks == ()
        assert [u.reason for u in resolution.unmatched] == [
            UnmatchedReason.NO_TASKS,
            UnmatchedReason.NOT_FOUND,
            UnmatchedReason.NO_TASKS,
        ]


async def test_a_reload_is_started_with_its_options_and_followed(certs: CertPaths) -> None:
    async with site(certs) as (client, state):
        task = TaskRef(id=A, name="Orders")
        options = ReloadOptions(partial=True, weight=4, variables=(("vRegion", "EMEA"),))
        started = await client.start_task(task, options)
        assert started.result is TaskResult.STARTED and started.execution_id is not None
        reload = state.reloads[started.execution_id]
        assert (reload["partial"], reload["weight"], reload["variables"]) == (
            True,
            4,
            {"vRegion": "EMEA"},
        )
        seen: list[str] = []

        async def on_change(execution: Any) -> None:
            seen.append(execution.state)

        end = await Tracker(client, 0.02).follow(
            task, started.execution_id, on_change, timeout_s=30
        )
        assert end.succeeded and end.last is not None
        assert (end.last.state, end.last.status) == ("SUCCEEDED", TaskStatus.FINISHED_SUCCESS)
        assert seen[-1] == "SUCCEEDED"


async def test_a_failed_reload_has_qlik_error_and_the_log_tail_as_reason(certs: CertPaths) -> None:
    async with site(certs) as (client, state):
        task = TaskRef(id=FAILS, name="Forecast")
        started = await client.start_task(task)
        assert started.execution_id is not None
        end = await Tracker(client, 0.02).follow(task, started.execution_id, timeout_s=30)
        assert end.last is not None and end.last.status is TaskStatus.FINISHED_FAIL
        log = state.logs[started.execution_id].splitlines()
        assert end.last.reason == "\n".join(["EDC_ERROR: Table not found", *log[-30:]])
        logs = [p for _, p, _ in calls(state) if "/reloads/logs/" in p]
        assert logs == [f"/api/v1/apps/{FAILS}/reloads/logs/{started.execution_id}"]  # read once


async def test_pending_refused_and_unknown(certs: CertPaths) -> None:
    fixture = tenant()
    fixture.apps.append(App(id=C.replace("3", "9"), name="Locked", reloadable=False))
    async with site(certs, fixture) as (client, _):
        first = await client.start_task(TaskRef(id=A, name="Orders"))
        assert first.result is TaskResult.STARTED
        # Qlik keeps one queued reload per app: the second queues, the third is refused.
        queued = await client.start_task(TaskRef(id=A, name="Orders"))
        assert queued.result is TaskResult.STARTED
        assert queued.execution_id != first.execution_id
        again = await client.start_task(TaskRef(id=A, name="Orders"))
        assert again.result is TaskResult.ALREADY_RUNNING
        assert (
            again.error == "Too many requests: a pending reload request already exists for this app"
        )
        locked = await client.start_task(TaskRef(id=C.replace("3", "9"), name="Locked"))
        assert (locked.result, locked.error) == (
            TaskResult.FAILED,
            "Qlik Cloud refused the reload: HTTP 403 RELOADS-003 Not allowed: you may not reload"
            " this app",
        )


async def test_a_lost_start_answer_is_read_back_not_sent_again(certs: CertPaths) -> None:
    async with site(certs) as (client, state):
        state.faults.lose_next = 1
        state.faults.lose_as = "503"
        state.faults.path_contains = "/api/v1/reloads"
        started = await client.start_task(TaskRef(id=A, name="Orders"))
        assert started.result is TaskResult.STARTED
        assert state.started == [A]
        [reload_id] = list(state.reloads)
        assert started.execution_id == reload_id
        assert [c for c in calls(state) if c[1] == "/api/v1/reloads"] == [
            ("POST", "/api/v1/reloads", 503),
            ("GET", "/api/v1/reloads", 200),
        ]


async def test_starts_wait_their_turn_in_order(certs: CertPaths) -> None:
    fixture = tenant()
    async with site(certs, fixture, max_starts_per_minute=2, rate_window_s=0.3) as (client, state):
        tasks = [TaskRef(id=i, name=i) for i in (A, B, C, FAILS)]
        results = await asyncio.gather(*(client.start_task(t) for t in tasks))
        assert [r.result for r in results] == [TaskResult.STARTED] * 4
        assert state.started == [A, B, C, FAILS]
        assert [r.waited_ms > 0 for r in results] == [False, False, True, True]
        posts = [e for e in state.journal if e.method == "POST"]
        # No more than 2 in any 0.3 s: the third went at least 0.3 s after the first.
        assert posts[2].started - posts[0].started >= 0.3


async def test_a_rate_limit_429_is_waited_out_and_the_start_repeated(certs: CertPaths) -> None:
    fixture = tenant(reload_limit=2, reload_window_s=1)
    retry = RetrySettings(attempts=3, backoff_s=0.01, max_backoff_s=10)
    async with site(certs, fixture, retry=retry) as (client, state):
        tasks = [TaskRef(id=i, name=i) for i in (A, B, C)]
        results = await asyncio.gather(*(client.start_task(t) for t in tasks))
        assert [r.result for r in results] == [TaskResult.STARTED] * 3
        assert state.started == [A, B, C]
        statuses = [status for method, _, status in calls(state) if method == "POST"]
        assert statuses[:2] == [201, 201] and statuses[-1] == 201
        assert set(statuses[2:-1]) == {429}
        assert results[2].waited_ms >= 500  # Retry-After is whole seconds


async def test_oauth_token_is_renewed_before_it_expires_and_on_401(certs: CertPaths) -> None:
    fixture = tenant(token_lifetime_s=3.0)
    async with site(
        certs,
        fixture,
        auth="oauth",
        api_key=None,
        client_id="sim-client",
        client_secret="sim-secret",
    ) as (client, state):
        await client.about()
        assert state.tokens_issued == 1

        async def renewed() -> bool:
            await client.about()
            return state.tokens_issued == 2

        await wait_until(renewed, what="a second token")
        assert all(status == 200 for _, path, status in calls(state) if path.startswith("/api/"))
        state.tokens.clear()  # revoked: the next call gets 401, then a new token, once
        await client.about()
        assert state.tokens_issued == 3
        assert [s for _, p, s in calls(state) if p.startswith("/api/")][-2:] == [401, 200]


async def test_wrong_credentials_say_which_key(certs: CertPaths) -> None:
    async with site(certs, api_key="wrong") as (client, _):
        with pytest.raises(QrsAuthError, match=r"HTTP 401 .*cloud\.api_key"):
            await client.about()
    async with site(
        certs, auth="oauth", api_key=None, client_id="sim-client", client_secret="nope"
    ) as (client, _):
        with pytest.raises(
            QrsAuthError, match=r"OAuth client 'sim-client'.*cloud\.client_secret"
        ) as info:
            await client.about()
        assert "nope" not in str(info.value)
