"""The QRS simulator over real HTTPS with mutual TLS: rules, endpoints, state machine, faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import trustme

from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.qrs.fixtures import Fixture
from mqtt_starter.simulators.qrs.server import QrsSimulator
from mqtt_starter.simulators.qrs.state import SimState
from tests.conftest import wait_until

KEY = "abcdefghij012345"
USER = "UserDirectory=INTERNAL; UserId=sa_repository"
SALES = "11111111-1111-4111-8111-111111111111"
FORECAST = "33333333-3333-4333-8333-333333333333"
BUDGET = "44444444-4444-4444-8444-444444444444"
ARCHIVE = "55555555-5555-4555-8555-555555555555"
LONG = "99999999-9999-4999-8999-999999999999"
QUEUED = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa"
EMPTY = "00000000-0000-0000-0000-000000000000"


def client_context(certs: CertPaths) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.root))
    context.load_cert_chain(certs.client, certs.client_key)
    return context


class Raw:
    """Plain HTTP calls to the simulator, with full control over every header and parameter."""

    def __init__(self, sim: QrsSimulator, session: aiohttp.ClientSession) -> None:
        self.sim = sim
        self.session = session

    async def __call__(
        self,
        method: str,
        path: str,
        query: str = "",
        *,
        xrfkey: str | None = KEY,
        header_key: str | None = None,
        user: str | None = USER,
        body: Any = None,
    ) -> tuple[int, Any]:
        headers = {}
        if xrfkey is not None:
            query = f"{query}&xrfkey={xrfkey}" if query else f"xrfkey={xrfkey}"
            headers["X-Qlik-Xrfkey"] = header_key or xrfkey
        if user is not None:
            headers["X-Qlik-User"] = user
        url = f"{self.sim.url}{path}" + (f"?{query}" if query else "")
        async with self.session.request(method, url, headers=headers, json=body) as response:
            text = await response.text()
            is_json = response.content_type == "application/json"
            return response.status, json.loads(text) if is_json else text


@pytest.fixture
async def raw(simulator: QrsSimulator) -> AsyncIterator[Raw]:
    connector = aiohttp.TCPConnector(ssl=client_context(simulator.certs))
    async with aiohttp.ClientSession(connector=connector) as session:
        yield Raw(simulator, session)


def f(text: str) -> str:
    return "filter=" + quote(text, safe="")


# -- request rules ---------------------------------------------------------------------------


XSRF = "XSRF prevention check failed. Possible XSRF discovered."


@pytest.mark.parametrize(
    ("xrfkey", "header_key"),
    [(None, None), ("short", None), ("abcdefghij01234!", None), (KEY, "abcdefghij012346")],
)
async def test_xrfkey_rule(raw: Raw, xrfkey: str | None, header_key: str | None) -> None:
    assert await raw("GET", "/qrs/about", xrfkey=xrfkey, header_key=header_key) == (403, XSRF)


async def test_xrfkey_parameter_name_is_case_insensitive(raw: Raw) -> None:
    status, _ = await raw("GET", "/qrs/about", f"Xrfkey={KEY}", xrfkey=None)
    assert status == 403  # no header
    url = f"{raw.sim.url}/qrs/about?Xrfkey={KEY}"
    async with raw.session.get(url, headers={"X-Qlik-Xrfkey": KEY}) as response:
        assert response.status == 200


@pytest.mark.parametrize("user", [USER, "UserDirectory=INTERNAL;UserId=sa_repository", None])
async def test_qlik_user_header_accepted_forms(raw: Raw, user: str | None) -> None:
    status, body = await raw("GET", "/qrs/about", user=user)
    assert status == 200
    assert body["schemaPath"] == "About"


async def test_malformed_qlik_user_is_refused_after_the_xrfkey_rule(raw: Raw) -> None:
    assert (await raw("GET", "/qrs/about", user="sa_repository"))[0] == 403
    assert await raw("GET", "/qrs/about", xrfkey=None, user="junk") == (403, XSRF)


async def test_empty_query_value(raw: Raw) -> None:
    assert await raw("GET", "/qrs/task", "filter=") == (400, "Missing parameter value(s)")


@pytest.mark.parametrize("client_cert", ["none", "other CA"])
async def test_clients_without_a_certificate_of_the_ca_are_refused(
    simulator: QrsSimulator, sim_state: SimState, client_cert: str
) -> None:
    context = ssl.create_default_context(cafile=str(simulator.certs.root))
    if client_cert == "other CA":
        trustme.CA().issue_cert("QlikClient").configure_cert(context)
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"{simulator.url}/qrs/about", ssl=context) as response:
                await response.read()
    assert sim_state.journal == []  # refused in the TLS handshake, before any request


@contextlib.asynccontextmanager
async def proxy_sim(
    certs: CertPaths, task_fixture: Fixture, **options: Any
) -> AsyncIterator[QrsSimulator]:
    sim = QrsSimulator(task_fixture, certs, prefix="jwt", token="s3cret", **options)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


def proxy_session(certs: CertPaths, *, keep_cookies: bool) -> aiohttp.ClientSession:
    context = ssl.create_default_context(cafile=str(certs.root))
    jar: aiohttp.abc.AbstractCookieJar = (
        aiohttp.CookieJar(unsafe=True) if keep_cookies else aiohttp.DummyCookieJar()
    )
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context), cookie_jar=jar)


PROXY_HEADERS = {"X-Qlik-Xrfkey": KEY, "X-Qlik-User": USER}
BEARER = {**PROXY_HEADERS, "Authorization": "Bearer s3cret"}


@pytest.mark.parametrize(
    ("bad_token", "status", "content_type"),
    [
        ("redirect", 302, "application/octet-stream"),
        ("401", 401, "text/plain"),
        ("html", 200, "text/html"),
    ],
)
async def test_proxy_mode_refuses_a_bad_token_as_configured(
    certs: CertPaths, task_fixture: Fixture, bad_token: str, status: int, content_type: str
) -> None:
    async with proxy_sim(certs, task_fixture, bad_token=bad_token) as sim:
        url = f"{sim.url}/qrs/about?xrfkey={KEY}"
        assert url.startswith(f"https://127.0.0.1:{sim.port}/jwt/qrs/")
        async with proxy_session(certs, keep_cookies=True) as s:
            for headers in (PROXY_HEADERS, {**PROXY_HEADERS, "Authorization": "Bearer nope"}):
                async with s.get(url, headers=headers, allow_redirects=False) as r:
                    assert (r.status, r.content_type) == (status, content_type)
                    if bad_token == "redirect":
                        assert r.headers["Location"].startswith(
                            "/jwt/internal_forms_authentication/?targetId="
                        )
                    assert "X-Qlik-Session-jwt" not in r.cookies
        assert sim.state is not None and sim.proxy is not None
        assert [(e.path, e.status) for e in sim.state.journal] == [("/qrs/about", status)] * 2
        assert sim.proxy.sessions == {}


async def test_proxy_session_cookie_stands_for_the_token(
    certs: CertPaths, task_fixture: Fixture
) -> None:
    async with proxy_sim(certs, task_fixture) as sim:
        url = f"{sim.url}/qrs/about?xrfkey={KEY}"
        async with proxy_session(certs, keep_cookies=True) as s:
            async with s.get(url, headers=BEARER) as r:
                assert r.status == 200
                cookie = r.cookies["X-Qlik-Session-jwt"]
                assert cookie["path"] == "/" and cookie["secure"] and cookie["httponly"]
            # The cookie alone is enough, and no second session is opened.
            for _ in range(3):
                async with s.get(url, headers=PROXY_HEADERS) as r:
                    assert r.status == 200 and "X-Qlik-Session-jwt" not in r.cookies
        assert sim.proxy is not None and list(sim.proxy.sessions.values()) == ["jwt-user"]


async def test_proxy_limits_parallel_sessions_per_user(
    certs: CertPaths, task_fixture: Fixture
) -> None:
    async with proxy_sim(certs, task_fixture, session_limit=5) as sim:
        url = f"{sim.url}/qrs/about?xrfkey={KEY}"
        # A client that drops the cookie opens a proxy session on every call.
        async with proxy_session(certs, keep_cookies=False) as s:
            answers = []
            for _ in range(6):
                async with s.get(url, headers=BEARER) as r:
                    answers.append((r.status, await r.text()))
        assert [a[0] for a in answers] == [200] * 5 + [403]
        assert answers[5][1] == "You have reached the limit of 5 parallel sessions"
        assert sim.proxy is not None and len(sim.proxy.sessions) == 5


# -- endpoints and filters -------------------------------------------------------------------


async def test_task_by_id_does_not_exist_but_typed_lookups_do(raw: Raw) -> None:
    assert (await raw("GET", f"/qrs/task/{SALES}"))[0] == 404
    status, body = await raw("GET", f"/qrs/reloadtask/{SALES}")
    assert (status, body["name"], body["schemaPath"]) == (200, "Reload Sales", "ReloadTask")
    assert (await raw("GET", f"/qrs/externalprogramtask/{SALES}"))[0] == 404
    status, body = await raw("GET", "/qrs/task/full", f(f"id eq {SALES}"))
    assert [t["name"] for t in body] == ["Reload Sales"]


async def test_lists_by_type_condensed_and_full(raw: Raw, task_fixture: Fixture) -> None:
    _, condensed = await raw("GET", "/qrs/task")
    assert len(condensed) == len(task_fixture.tasks)
    assert set(condensed[0]) == {
        "id",
        "name",
        "taskType",
        "enabled",
        "taskSessionTimeout",
        "maxRetries",
        "privileges",
        "operational",
    }
    _, external = await raw("GET", "/qrs/externalprogramtask/full")
    assert sorted(t["name"] for t in external) == ["Export to Data Lake", "Queued Cleanup"]
    assert {t["taskType"] for t in external} == {1}
    assert await raw("GET", "/qrs/reloadtask/count") == (200, {"value": 9})
    _, never = await raw("GET", "/qrs/task/full", f(f"id eq {SALES}"))
    assert never[0]["operational"]["lastExecutionResult"]["startTime"] == (
        "1753-01-01T00:00:00.000Z"
    )


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("tags.name eq 'nightly'", ["Reload Sales", "Reload Stock", "Reload Archive"]),
        ("TAGS.NAME EQ 'Nightly' AND enabled eq false", ["Reload Archive"]),
        (
            "name eq 'Reload Sales' or name eq 'Reload Stock' and tags.name eq 'none'",
            ["Reload Sales"],
        ),
        (
            "(name eq 'Reload Sales' or name eq 'Reload Stock') and tags.name eq 'startTask1'",
            ["Reload Sales"],
        ),
        (r"tags.name eq 'Q1\'25'", ["Quarter report"]),
        (r"tags.name eq 'back\\slash'", ["Quarter report"]),
        ("tags.name eq 'a&b#c+d/e%f'", ["Quarter report"]),
        ("tags.name eq 'Ünïcødé ☃'", ["Quarter report"]),
        ("name sw 'reload s'", ["Reload Sales", "Reload Stock"]),
        ("name ew 'lake'", ["Export to Data Lake"]),
        ("name so 'CAST'", ["Reload Forecast"]),
        (
            "customProperties.definition.name eq 'taskGroup'"
            " and customProperties.value eq 'tasks2'",
            ["Reload Stock", "CP decoy"],
        ),
        (f"id eq {SALES.upper()}", ["Reload Sales"]),
        ("maxRetries ge 2", ["Reload Budget"]),
        ("maxRetries gt 2", []),
        ("tags.name ne 'Nightly' and name eq 'Reload Sales'", ["Reload Sales"]),
        ("operational.lastExecutionResult.startTime lt '1800-01-01'", None),
    ],
)
async def test_filter_engine(
    raw: Raw, task_fixture: Fixture, text: str, names: list[str] | None
) -> None:
    status, body = await raw("GET", "/qrs/task/full", f(text))
    assert status == 200
    expected = names if names is not None else [t.name for t in task_fixture.tasks]
    assert sorted(t["name"] for t in body) == sorted(expected)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("()", "Invalid expression"),
        ("name eq 'a' and ()", "Invalid expression"),
        ("name eq 'a''b'", "Cannot parse the expression: name eq 'a''b'"),
        ("name eq 'open", "Cannot parse the expression: name eq 'open"),
        ("name eq unquoted", "Cannot parse the expression: name eq unquoted"),
        ("name like 'x'", "Cannot parse the expression: name like 'x'"),
        ("not name eq 'x'", "Cannot parse the expression: not name eq 'x'"),
        ("(name eq 'x'", "Cannot parse the expression: (name eq 'x'"),
        ("name eq 'x' or", "Cannot parse the expression: name eq 'x' or"),
        (r"name eq 'bad \escape'", r"Cannot parse the expression: name eq 'bad \escape'"),
    ],
)
async def test_filter_errors(raw: Raw, text: str, answer: str) -> None:
    assert await raw("GET", "/qrs/task/full", f(text)) == (400, answer)


async def test_unencoded_plus_reads_as_a_space(raw: Raw) -> None:
    # Why the client encodes the whole filter: a bare `+` in a query is a space.
    status, body = await raw("GET", "/qrs/task/full", "filter=name%20eq%20'Reload+Sales'")
    assert (status, [t["name"] for t in body]) == (200, ["Reload Sales"])


# -- state machine ---------------------------------------------------------------------------


async def results(raw: Raw, session: str) -> list[dict[str, Any]]:
    _, body = await raw("GET", "/qrs/executionresult/full", f(f"executionID eq {session}"))
    assert isinstance(body, list)
    return body


async def run_to_end(raw: Raw, session: str) -> list[dict[str, Any]]:
    async def ended() -> bool:
        return (await raw("GET", f"/qrs/executionsession/{session}"))[0] == 404

    await wait_until(ended, what=f"session {session} to end")
    return await results(raw, session)


def states(result: dict[str, Any]) -> list[str]:
    return [d["message"] for d in result["details"] if d["detailsType"] == 2]


async def test_successful_execution(raw: Raw, sim_state: SimState) -> None:
    status, body = await raw("POST", f"/qrs/task/{SALES}/start/synchronous")
    assert status == 201
    session = body["value"]
    assert (await raw("GET", f"/qrs/executionsession/{session}"))[0] == 200
    # Already running: the empty GUID, and /start does nothing.
    assert await raw("POST", f"/qrs/task/{SALES}/start/synchronous") == (201, {"value": EMPTY})
    assert await raw("POST", f"/qrs/task/{SALES}/start") == (204, "")
    [result] = await run_to_end(raw, session)
    assert result["status"] == 7
    assert result["taskID"] == SALES
    assert 250 <= result["duration"] <= 3000
    assert result["stopTime"] > result["startTime"] > "1753"
    assert states(result) == [
        "Changing task state to Triggered",
        "Trying to start task. Sending task to slave scheduler",
        "Changing task state from Triggered to Started",
        "Changing task state from Started to FinishedSuccess",
    ]
    _, [task] = await raw("GET", "/qrs/task/full", f(f"id eq {SALES}"))
    assert task["operational"]["lastExecutionResult"]["status"] == 7
    assert sim_state.started == [SALES]


async def test_failure_with_retry_adds_results_under_one_session(raw: Raw) -> None:
    _, body = await raw("POST", f"/qrs/task/{BUDGET}/start/synchronous")
    first, second = await run_to_end(raw, body["value"])
    assert (first["status"], second["status"]) == (8, 7)
    assert first["executionID"] == second["executionID"] == body["value"]
    assert states(second)[:2] == [
        "Changing task state to Retry",
        "Changing task state from Retry to Triggered",
    ]


async def test_failure_without_retries(raw: Raw) -> None:
    _, body = await raw("POST", f"/qrs/task/{FORECAST}/start/synchronous")
    [result] = await run_to_end(raw, body["value"])
    assert result["status"] == 8
    assert [d["message"] for d in result["details"] if d["detailsType"] == 0] == [
        "Field 'Amount' not found"
    ]


async def test_disabled_task_does_not_start(raw: Raw, sim_state: SimState) -> None:
    assert await raw("POST", f"/qrs/task/{ARCHIVE}/start/synchronous") == (201, {"value": EMPTY})
    assert sim_state.started == []


async def test_concurrency_limit_queues_and_stop_aborts(
    certs: CertPaths, task_fixture: Fixture
) -> None:
    # One start slot: the long run holds it, so the second waits Queued until it is stopped.
    sim = QrsSimulator(task_fixture.model_copy(update={"max_concurrent": 1}), certs)
    await sim.start()
    try:
        connector = aiohttp.TCPConnector(ssl=client_context(certs))
        async with aiohttp.ClientSession(connector=connector) as session:
            raw = Raw(sim, session)
            sessions = [
                (await raw("POST", f"/qrs/task/{task_id}/start/synchronous"))[1]["value"]
                for task_id in (LONG, SALES)
            ]

            async def second_queued() -> bool:
                return bool([r["status"] for r in await results(raw, sessions[1])] == [3])

            await wait_until(second_queued, what="the second execution to be Queued")
            assert (await raw("POST", f"/qrs/task/{LONG}/stop")) == (204, "")
            [aborted] = await run_to_end(raw, sessions[0])
            assert aborted["status"] == 6
            assert states(aborted)[-3:] == [
                "Changing task state from Started to AbortInitiated",
                "Changing task state from AbortInitiated to Aborting",
                "Changing task state from Aborting to Aborted",
            ]
            [second] = await run_to_end(raw, sessions[1])
            assert second["status"] == 7
            assert "Changing task state from Triggered to Queued" in states(second)
    finally:
        await sim.stop()


async def test_scripted_queue_time(raw: Raw) -> None:
    _, body = await raw("POST", f"/qrs/task/{QUEUED}/start/synchronous")
    [result] = await run_to_end(raw, body["value"])
    assert states(result)[2:4] == [
        "Changing task state from Triggered to Queued",
        "Changing task state from Queued to Started",
    ]


async def test_start_by_name_many_and_unknown(raw: Raw, sim_state: SimState) -> None:
    assert await raw("POST", "/qrs/task/start", f"name={quote('reload sales')}") == (204, "")
    status, body = await raw("POST", "/qrs/task/start/synchronous", "name=Reload%20Stock")
    assert status == 201 and body["value"] != EMPTY
    assert (await raw("POST", "/qrs/task/start", "name=Nope"))[0] == 404
    assert (await raw("POST", "/qrs/task/99999999-0000-4000-8000-000000000000/start"))[0] == 404
    many = [FORECAST, "00000000-1111-4000-8000-000000000000", QUEUED]
    assert await raw("POST", "/qrs/task/start/many", body=many) == (204, "")
    assert sim_state.started == [SALES, "22222222-2222-4222-8222-222222222222", FORECAST, QUEUED]


# -- faults and journal ------------------------------------------------------------------------


async def test_fail_next_then_recover_and_journal(raw: Raw, sim_state: SimState) -> None:
    sim_state.faults.fail_next = 2
    assert (await raw("GET", "/qrs/about"))[0] == 503
    assert (await raw("GET", "/qrs/about"))[0] == 503
    assert (await raw("GET", "/qrs/about", f"extra={quote('a b')}"))[0] == 200
    assert [(e.method, e.path, e.query, e.status) for e in sim_state.journal] == [
        ("GET", "/qrs/about", {"xrfkey": KEY}, 503),
        ("GET", "/qrs/about", {"xrfkey": KEY}, 503),
        ("GET", "/qrs/about", {"extra": "a b", "xrfkey": KEY}, 200),
    ]


async def test_hang_and_drop(raw: Raw, sim_state: SimState) -> None:
    sim_state.faults.hang_next, sim_state.faults.hang_s = 1, 0.5
    sim_state.faults.drop_next = 1
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(raw("GET", "/qrs/about"), 0.2)
    # A POST: aiohttp itself retries an idempotent GET once on a dropped keep-alive connection.
    with pytest.raises(aiohttp.ClientError):
        await raw("POST", f"/qrs/task/{SALES}/stop")
    assert (await raw("GET", "/qrs/about"))[0] == 200
    await wait_until(
        lambda: all(e.ended is not None for e in sim_state.journal),
        what="the hung call to be closed",
    )
    assert [e.status for e in sim_state.journal] == [200, 0, 200]


async def test_held_calls_and_peak_in_flight(raw: Raw, sim_state: SimState) -> None:
    sim_state.faults.open.clear()
    calls = asyncio.gather(*(raw("GET", "/qrs/about") for _ in range(5)))
    await wait_until(lambda: sim_state.in_flight == 5, what="five calls held")
    assert [e.status for e in sim_state.journal] == [0] * 5
    sim_state.faults.open.set()
    assert [status for status, _ in await calls] == [200] * 5
    assert sim_state.peak_in_flight == 5


async def test_delay_slows_every_answer(raw: Raw, sim_state: SimState) -> None:
    sim_state.faults.delay_s = 0.2
    await raw("GET", "/qrs/about")
    [entry] = sim_state.journal
    assert entry.ended is not None and entry.ended - entry.started >= 0.2


async def test_control_endpoints(raw: Raw, sim_state: SimState) -> None:
    await raw("POST", f"/qrs/task/{SALES}/start")
    status, body = await raw(
        "POST", "/_sim/faults", body={"failNext": 1, "failStatus": 500}, xrfkey=None
    )
    assert status == 200 and body["failNext"] == 1
    assert (await raw("GET", "/qrs/about"))[0] == 500
    status, journal = await raw("GET", "/_sim/journal", xrfkey=None)
    assert [(e["method"], e["path"], e["status"]) for e in journal["entries"]] == [
        ("POST", f"/qrs/task/{SALES}/start", 204),
        ("GET", "/qrs/about", 500),
    ]
    assert journal["started"] == [SALES]
    assert (await raw("DELETE", "/_sim/journal", xrfkey=None))[0] == 204
    assert sim_state.journal == [] and sim_state.started == []
    assert (await raw("POST", "/_sim/faults", body={"bogus": 1}, xrfkey=None))[0] == 400


# -- the entities as real QRS shows them -----------------------------------------------------------

EXECUTION_FIELDS = {
    "id",
    "taskID",
    "executionID",
    "appID",
    "status",
    "startTime",
    "stopTime",
    "duration",
    "executingNodeName",
    "fileReferenceID",
    "scriptLogAvailable",
    "scriptLogLocation",
    "scriptLogSize",
    "details",
    # Every QRS entity carries these; the monitor asks for what changed since a moment.
    "createdDate",
    "modifiedDate",
    "schemaPath",
}


async def test_plain_execution_results_are_condensed(raw: Raw) -> None:
    _, body = await raw("POST", f"/qrs/task/{SALES}/start/synchronous")
    session = body["value"]
    status, condensed = await raw("GET", "/qrs/executionresult", f(f"executionID eq {session}"))
    [full] = await results(raw, session)
    assert status == 200
    assert condensed == [{"id": full["id"], "privileges": None}]
    assert set(full) == EXECUTION_FIELDS
    assert (full["taskID"], full["executionID"]) == (SALES, session)
    assert await raw("GET", "/qrs/executionresult/count", f(f"executionID eq {session}")) == (
        200,
        {"value": 1},
    )


async def test_index_answers_like_the_filter_engine(raw: Raw) -> None:
    sessions = [
        (await raw("POST", f"/qrs/task/{task}/start/synchronous"))[1]["value"]
        for task in (SALES, FORECAST)
    ]
    for session in sessions:
        indexed = await results(raw, session)
        _, scanned = await raw(
            "GET", "/qrs/executionresult/full", f(f"(executionID eq {session.upper()})")
        )
        assert [r["id"] for r in indexed] == [r["id"] for r in scanned]
        [one] = indexed
        _, by_id = await raw("GET", "/qrs/executionresult/full", f(f"id eq {one['id']}"))
        assert [r["id"] for r in by_id] == [one["id"]]
    unknown = "12345678-0000-4000-8000-000000000000"
    assert await raw("GET", "/qrs/executionresult/full", f(f"executionID eq {unknown}")) == (
        200,
        [],
    )


async def test_last_execution_result_is_live(raw: Raw) -> None:
    _, body = await raw("POST", f"/qrs/task/{LONG}/start/synchronous")
    session = body["value"]

    async def last() -> dict[str, Any]:
        _, [task] = await raw("GET", "/qrs/task/full", f(f"id eq {LONG}"))
        result: dict[str, Any] = task["operational"]["lastExecutionResult"]
        return result

    [result] = await results(raw, session)
    seen = await last()
    # From Triggered on, the task points at the run in progress, with the run's own result id.
    assert seen["id"] == result["id"]
    assert seen["status"] in (1, 2)
    assert set(seen) == {"id", "status", "startTime", "stopTime", "duration", "details"}

    async def started() -> bool:
        return bool((await last())["status"] == 2)

    await wait_until(started, what="the task's last result to show Started")
    # The condensed list carries the same operational part.
    _, condensed = await raw("GET", "/qrs/task", f(f"id eq {LONG}"))
    assert condensed[0]["operational"]["lastExecutionResult"]["status"] == 2
    assert (await raw("POST", f"/qrs/task/{LONG}/stop"))[0] == 204
    await run_to_end(raw, session)
    assert (await last())["status"] == 6


async def test_task_types_and_starts_that_qrs_declines(raw: Raw, sim_state: SimState) -> None:
    _, tasks = await raw("GET", "/qrs/task/full", f("tags.name eq 'Types'"))
    assert sorted((t["name"], t["taskType"], t["schemaPath"]) for t in tasks) == [
        ("Sync Users", 2, "UserSyncTask"),
        ("Warm the Sales app", 4, "PreloadTask"),
    ]
    users = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"
    assert await raw("POST", f"/qrs/task/{users}/start/synchronous") == (
        400,
        f"Task {users} is a user synchronization task",
    )
    # Enabled and idle, but QRS cannot start it (no scheduler, app unavailable).
    no_scheduler = "dddddddd-dddd-4ddd-8ddd-dddddddddddd"
    assert await raw("POST", f"/qrs/task/{no_scheduler}/start/synchronous") == (
        201,
        {"value": EMPTY},
    )
    _, body = await raw("POST", "/qrs/task/cccccccc-cccc-4ccc-8ccc-cccccccccccc/start/synchronous")
    assert body["value"] != EMPTY
    assert sim_state.started == ["cccccccc-cccc-4ccc-8ccc-cccccccccccc"]


@pytest.mark.parametrize("lose_as", ["drop", "503"])
async def test_a_lost_answer_still_starts_the_task(
    raw: Raw, sim_state: SimState, lose_as: str
) -> None:
    sim_state.faults.lose_next, sim_state.faults.lose_as = 1, lose_as
    sim_state.faults.path_contains = "/start"
    # The fault waits for a matching call: this one passes.
    assert (await raw("GET", "/qrs/about"))[0] == 200
    if lose_as == "drop":
        with pytest.raises(aiohttp.ClientError):
            await raw("POST", f"/qrs/task/{SALES}/start/synchronous")
    else:
        assert (await raw("POST", f"/qrs/task/{SALES}/start/synchronous"))[0] == 503
    assert sim_state.started == [SALES]
    assert next(iter(sim_state.sessions.values())).task.id == SALES
    # The next start finds the task running: the empty GUID.
    assert await raw("POST", f"/qrs/task/{SALES}/start/synchronous") == (201, {"value": EMPTY})
    assert [e.status for e in sim_state.journal] == [200, 0 if lose_as == "drop" else 503, 201]


async def test_qlik_user_values_are_percent_decoded(raw: Raw, sim_state: SimState) -> None:
    user = "UserDirectory=CORP%20EU; UserId=j%C3%B6rg%3Bx"
    assert (await raw("GET", "/qrs/about", user=user))[0] == 200
    assert sim_state.journal[-1].user == "CORP EU\\jörg;x"


async def test_results_and_journal_are_bounded(certs: CertPaths, task_fixture: Fixture) -> None:
    fixture = task_fixture.model_copy(update={"results_per_task": 2, "journal_limit": 100})
    sim = QrsSimulator(fixture, certs)
    await sim.start()
    try:
        connector = aiohttp.TCPConnector(ssl=client_context(certs))
        async with aiohttp.ClientSession(connector=connector) as session:
            raw = Raw(sim, session)
            task = "66666666-6666-4666-8666-666666666666"
            sessions = []
            for _ in range(3):
                sessions.append((await raw("POST", f"/qrs/task/{task}/start/synchronous"))[1])
                await run_to_end(raw, sessions[-1]["value"])
            assert await results(raw, sessions[0]["value"]) == []
            assert [len(await results(raw, s["value"])) for s in sessions[1:]] == [1, 1]
            assert sim.state is not None
            assert len(sim.state.result_by_id) == 2
            for _ in range(150):
                await raw("GET", "/qrs/about")
            assert len(sim.state.journal) <= 100
            assert sim.state.journal[-1].path == "/qrs/about"
    finally:
        await sim.stop()
