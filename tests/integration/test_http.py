"""The HTTP endpoint of the daemon process: health, readiness, metrics, Butler's start API."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from mqtt_starter.simulators.qrs.server import QrsSimulator
from mqtt_starter.simulators.qrs.state import SimState
from tests.conftest import free_port, wait_until
from tests.integration import helpers
from tests.integration.conftest import Broker, Client, LocalDaemon, daemon_config
from tests.integration.helpers import ARCHIVE, DECOY, EXPORT, SALES, STOCK, executions


@pytest.fixture
def make_daemon(make_local_daemon: Any) -> Any:
    """The daemon in-process: nothing here depends on it being a process."""
    return make_local_daemon


class Http:
    def __init__(
        self, session: aiohttp.ClientSession, port: int, daemon: LocalDaemon | None = None
    ) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"
        self.daemon = daemon

    async def __call__(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        raw: bytes | None = None,
        token: str | None = None,
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.request(
            method, self.base + path, json=body, data=raw, headers=headers
        ) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()


@pytest.fixture
async def http(make_daemon: Any) -> AsyncIterator[Http]:
    port = free_port()
    daemon = await make_daemon(
        http={"enabled": True, "port": port},
        policy={
            "allow": {
                "tags": ["Nightly", "startTask1"],
                "custom_properties": [{"name": "taskGroup", "value": "tasks2"}],
            },
            "max_payload_bytes": 1000,
        },
    )
    async with aiohttp.ClientSession() as session:
        yield Http(session, port, daemon)


async def test_health_and_readiness(http: Http) -> None:
    assert await http("GET", "/healthz") == (200, {"status": "alive"})
    assert await http("GET", "/readyz") == (200, {"status": "ready"})


async def test_readiness_fails_without_the_broker(
    private_broker: Broker, simulator: QrsSimulator
) -> None:
    port = free_port()
    daemon = LocalDaemon(
        daemon_config(private_broker, simulator, http={"enabled": True, "port": port})
    )
    await daemon.start()
    try:
        async with aiohttp.ClientSession() as session:
            http = Http(session, port)
            assert (await http("GET", "/readyz"))[0] == 200
            private_broker.stop()

            async def not_ready() -> bool:
                return (await http("GET", "/readyz"))[0] == 503

            await wait_until(not_ready, what="readyz to say 503")
            _, body = await http("GET", "/readyz")
    finally:
        await daemon.stop()
    assert body == {
        "status": "not ready",
        "reasons": [f"not connected to the broker 127.0.0.1:{private_broker.port}"],
    }


async def test_butler_start_by_id_in_the_path(http: Http, sim_state: SimState) -> None:
    assert await http("PUT", f"/v4/reloadtask/{SALES}/start") == (
        200,
        {
            "tasksId": {
                "started": [{"taskId": SALES, "taskName": "Reload Sales"}],
                "invalid": [],
                "denied": [],
            },
            "tasksTag": [],
            "tasksTagDenied": [],
            "tasksCP": [],
            "tasksCPDenied": [],
        },
    )
    assert sim_state.started == [SALES]


async def test_butler_body_with_every_item_kind(http: Http, sim_state: SimState) -> None:
    status, body = await http(
        "POST",
        "/v4/reloadtask/-/start",
        body=[
            {"type": "starttaskid", "payload": {"taskId": STOCK}},
            {"type": "starttaskid", "payload": {"taskId": "not-a-guid"}},
            {"type": "starttaskid", "payload": {"taskId": DECOY}},
            {"type": "starttasktag", "payload": {"tag": "startTask1"}},
            {
                "type": "starttaskcustomproperty",
                "payload": {"customPropertyName": "taskGroup", "customPropertyValue": "tasks1"},
            },
            {"type": "keyvaluestore", "payload": {"namespace": "a", "key": "b", "value": "c"}},
        ],
    )
    assert (status, body) == (
        200,
        {
            "tasksId": {
                "started": [{"taskId": STOCK, "taskName": "Reload Stock"}],
                "invalid": [{"taskId": "not-a-guid"}],
                "denied": [{"taskId": DECOY}],
            },
            # Reload Sales matched by tag and custom property: started once, listed under both.
            "tasksTag": [
                {"taskId": SALES, "taskName": "Reload Sales"},
                {"taskId": EXPORT, "taskName": "Export to Data Lake"},
            ],
            "tasksTagDenied": [],
            "tasksCP": [{"taskId": SALES, "taskName": "Reload Sales"}],
            "tasksCPDenied": [{"name": "taskGroup", "value": "tasks1"}],
            "ignored": ["keyvaluestore"],  # said, never silently
        },
    )
    assert sorted(sim_state.started) == sorted([STOCK, SALES, EXPORT])


async def test_butler_denied_tag(http: Http, sim_state: SimState) -> None:
    status, body = await http(
        "PUT",
        "/v4/reloadtask/-/start",
        body=[{"type": "starttasktag", "payload": {"tag": "Fragile"}}],
    )
    assert (status, body["tasksTag"], body["tasksTagDenied"]) == (200, [], [{"tag": "Fragile"}])
    assert sim_state.started == []


async def test_butler_all_task_ids_must_exist(http: Http, sim_state: SimState) -> None:
    status, body = await http(
        "POST",
        f"/v4/reloadtask/{SALES}/start?allTaskIdsMustExist=true",
        body=[{"type": "starttaskid", "payload": {"taskId": "99999999-0000-4000-8000-0000"}}],
    )
    assert (status, body["tasksId"]) == (
        200,
        {
            "started": [],
            "invalid": [{"taskId": "99999999-0000-4000-8000-0000"}],
            "denied": [{"taskId": SALES}],
        },
    )
    assert sim_state.started == []


async def test_butler_not_started_ids_are_denied(http: Http, sim_state: SimState) -> None:
    status, body = await http("PUT", f"/v4/reloadtask/{ARCHIVE}/start")
    assert (status, body["tasksId"]) == (
        200,
        {"started": [], "invalid": [], "denied": [{"taskId": ARCHIVE}]},
    )


@pytest.mark.parametrize(
    ("path", "raw", "message"),
    [
        (
            "/v4/reloadtask/-/start",
            b"{bad",
            "invalid JSON: Expecting property name enclosed in"
            " double quotes: line 1 column 2 (char 1)",
        ),
        (
            "/v4/reloadtask/-/start",
            b'{"type": "starttaskid"}',
            "body must be a JSON array of {type, payload} items",
        ),
        (
            "/v4/reloadtask/-/start",
            b'[{"type": "nope", "payload": {}}]',
            "[0].type: unknown type 'nope'; expected one of starttaskid, starttasktag,"
            " starttaskcustomproperty, keyvaluestore",
        ),
        ("/v4/reloadtask/-/start", b"", "no task id in the path and no items in the body"),
        (
            f"/v4/reloadtask/{SALES}/start?allTaskIdsMustExist=maybe",
            b"",
            "allTaskIdsMustExist: expected true or false",
        ),
    ],
)
async def test_butler_bad_requests(
    http: Http, sim_state: SimState, path: str, raw: bytes, message: str
) -> None:
    assert await http("POST", path, raw=raw) == (400, {"code": "bad_payload", "message": message})
    assert sim_state.started == []


async def test_an_http_start_is_the_same_request_as_mqtt(
    http: Http, mqtt: Client, sim_state: SimState
) -> None:
    await mqtt.subscribe(f"{helpers.BASE}/status/task/{SALES}")
    assert (await http("POST", f"/v4/reloadtask/{SALES}/start"))[0] == 200
    [execution_id] = executions(sim_state, SALES)
    # The run it started is followed, and its status events published, as for MQTT.
    events = await mqtt.wait_for(
        f"{helpers.BASE}/status/task/{SALES}",
        1,
        until=lambda m: m.json()["state"] == "FinishedSuccess",
    )
    assert {e.json()["executionId"] for e in events} == {execution_id}
    assert events[-1].json()["startedBy"] == "mqtt-starter"
    assert http.daemon is not None
    assert (
        f"request http POST /v4/reloadtask/{SALES}/start requestId=None -> ok started=1"
        in http.daemon.log
    )
    _, text = await http("GET", "/metrics")
    assert 'mqtt_starter_triggers_total{kind="http",outcome="accepted"} 1.0' in text


async def test_http_bodies_obey_policy_max_payload_bytes(http: Http, sim_state: SimState) -> None:
    body = b'[{"type": "starttasktag", "payload": {"tag": "' + b"x" * 1000 + b'"}}]'
    assert await http("POST", "/v4/reloadtask/-/start", raw=body) == (
        413,
        {"code": "payload_too_large", "message": "payload is larger than 1000 bytes (the limit)"},
    )
    assert sim_state.started == []
    assert http.daemon is not None
    assert "request http POST /v4/reloadtask/-/start requestId=None -> error payload_too_large" in (
        http.daemon.log
    )


async def test_metrics(http: Http, mqtt: Client, sim_state: SimState) -> None:
    await http("PUT", f"/v4/reloadtask/{SALES}/start")
    await mqtt.request(f"{helpers.BASE}/start/id/{STOCK}")
    await mqtt.request(f"{helpers.BASE}/start", b"{bad")
    status, text = await http("GET", "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    for expected in (
        'mqtt_starter_triggers_total{kind="http",outcome="accepted"} 1.0',
        'mqtt_starter_triggers_total{kind="id",outcome="accepted"} 1.0',
        'mqtt_starter_triggers_total{kind="payload",outcome="refused"} 1.0',
        'mqtt_starter_tasks_total{result="started"} 2.0',
        "mqtt_starter_broker_connected 1.0",
        "mqtt_starter_broker_reconnects_total 0.0",
    ):
        assert expected in lines, expected
    assert any(
        line.startswith(
            'mqtt_starter_qrs_request_seconds_count{operation="POST task",status="201"} 2.0'
        )
        for line in lines
    )
    assert any(line.startswith("mqtt_starter_executions_in_flight ") for line in lines)


async def test_token_is_required_when_set(make_daemon: Any) -> None:
    port = free_port()
    daemon: LocalDaemon = await make_daemon(
        http={"enabled": True, "port": port, "token": "tok-Q7vX"}
    )
    async with aiohttp.ClientSession() as session:
        http = Http(session, port)
        assert await http("GET", "/healthz") == (
            401,
            {"code": "unauthorized", "message": "a valid bearer token is required"},
        )
        assert (await http("GET", "/metrics", token="wrong"))[0] == 401
        assert await http("GET", "/healthz", token="tok-Q7vX") == (200, {"status": "alive"})
    assert "tok-Q7vX" not in daemon.log


async def test_open_pages_do_not_hold_up_a_stop(make_daemon: Any) -> None:
    # aiohttp waits for open requests up to its shutdown timeout (a minute); a status page's
    # event stream never ends by itself, so the endpoint must end it.
    port = free_port()
    daemon: LocalDaemon = await make_daemon(http={"enabled": True, "port": port})
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/events") as events,
    ):
        assert (await events.content.readuntil(b"\n\n")).startswith(b"event: snapshot")
        await daemon.stop()  # within its deadline, with the page still open
        assert daemon.daemon is not None and daemon.daemon.board.pages == 0
        assert await events.content.read() == b""  # the stream ended


async def test_butlers_rest_call_over_https(
    make_daemon: Any, sim_state: SimState, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "http.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "http_key.pem"))
    port = free_port()
    tls = {"cert_file": str(tmp_path / "http.pem"), "key_file": str(tmp_path / "http_key.pem")}
    await make_daemon(http={"enabled": True, "port": port, "token": "t-9", "tls": tls})
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with (
        aiohttp.ClientSession() as session,
        session.put(
            f"https://127.0.0.1:{port}/v4/reloadtask/{SALES}/start",
            headers={"Authorization": "Bearer t-9"},
            ssl=client_context,
        ) as response,
    ):
        assert response.status == 200
        answer = await response.json()
    assert answer["tasksId"]["started"] == [{"taskId": SALES, "taskName": "Reload Sales"}]
    assert sim_state.started == [SALES]
