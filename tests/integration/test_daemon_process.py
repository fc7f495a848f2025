"""The daemon as an operator meets it: configuration errors, reload, logs, TLS to the broker."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from mqtt_starter.simulators.qrs.server import QrsSimulator
from mqtt_starter.simulators.qrs.state import SimState
from tests.conftest import free_port, wait_until
from tests.integration import helpers
from tests.integration.conftest import (
    Broker,
    Client,
    Daemon,
    daemon_config,
    site_config,
    tls_settings,
)
from tests.integration.helpers import (
    FORECAST,
    LONG,
    SALES,
    line,
    only_nightly_started,
    reply,
)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mqtt_starter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_invalid_configuration_exits_78_naming_every_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("mqtt:\n  port: 99999\n  colour: red\npolicy:\n  allow: {tags: Nightly}\n")
    result = run_cli("run", "-c", str(config))
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "mqtt-starter: invalid configuration:",
        "  mqtt.port: input should be less than or equal to 65535",
        "  mqtt.colour: extra inputs are not permitted",
        "  qrs: field required: `qrs` (client-managed Sense) or `cloud` (Qlik Cloud)",
        "  policy.allow.tags: input should be a valid list",
    ]


def test_unreadable_certificates_exit_78(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"qrs:\n  url: https://sense:4242\n  cert_file: {tmp_path}/none.pem\n"
        f"  key_file: {tmp_path}/none_key.pem\n  ca_file: {tmp_path}/root.pem\n"
    )
    result = run_cli("run", "-c", str(config))
    assert result.returncode == 78
    assert f"  qrs.cert_file: cannot read {tmp_path}/none.pem" in result.stderr.splitlines()


async def test_sighup_reloads_policy_and_routes_keeping_the_session(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    daemon: Daemon = await make_daemon()
    assert daemon.notify is not None
    before = await mqtt.request(
        f"{helpers.BASE}/start/id/{FORECAST}", {"requestId": "before-reload"}
    )
    config = dict(daemon.config)
    config["policy"] = {"allow": {"tags": ["Nightly"]}}
    config["routes"] = [{"topic": "line/+/done", "names": ["Reload {1}"]}]
    daemon.write_config(config)
    seen = len(daemon.notify.messages)
    daemon.signal(signal.SIGHUP)
    await daemon.notify.wait_for("STATUS=configuration reloaded", after=seen)
    answer = await mqtt.request(f"{helpers.BASE}/start/tag/startTask1")
    assert answer == only_nightly_started(sim_state)
    await mqtt.subscribe(f"{helpers.BASE}/reply/line/#")
    await mqtt.publish("line/Stock/done")
    [routed] = await mqtt.wait_for(f"{helpers.BASE}/reply/line/Stock/done")
    assert routed.json()["tasks"][0]["taskName"] == "Reload Stock"
    # New subscriptions mean a new connection, under the same client id and session.
    assert daemon.log.count("connected to broker") == 2
    assert daemon.log.count(f"as {helpers.INSTANCE} (MQTT 5)") == 2
    # The requestId memory outlives the reload: a repeat starts nothing.
    again = await mqtt.request(
        f"{helpers.BASE}/start/id/{FORECAST}", {"requestId": "before-reload"}
    )
    assert again == {**before, "replayed": True}
    assert sim_state.started.count(FORECAST) == 1


async def test_an_invalid_reload_keeps_the_running_configuration(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    daemon: Daemon = await make_daemon()
    assert daemon.notify is not None
    daemon.config_path.write_text("mqtt: {port: nope}\n")
    seen = len(daemon.notify.messages)
    daemon.signal(signal.SIGHUP)
    await daemon.notify.wait_for("STATUS=reload refused: invalid configuration", after=seen)
    assert "reload refused, keeping the running configuration: mqtt.port:" in daemon.log
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{SALES}")
    assert answer["status"] == "ok"


async def test_json_logs_carry_no_secret(make_daemon: Any, mqtt: Client, tmp_path: Path) -> None:
    secret_file = tmp_path / "jwt"
    secret_file.write_text("file-secret-123\n")
    daemon: Daemon = await make_daemon(
        start=False,
        log={"format": "json", "level": "DEBUG"},
        mqtt={"username": "starter", "password": "${MQTT_PW}"},
        http={"token_file": str(secret_file)},
    )
    await daemon.start(env={"MQTT_PW": "env-secret-456"})
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{SALES}", {"requestId": "log-me"})
    assert answer["status"] == "ok"
    await mqtt.request(f"{helpers.BASE}/start", b"{broken")
    await daemon.stop()
    records = [json.loads(text) for text in daemon.log.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    messages = [r["message"] for r in records]
    assert any("requestId=log-me -> ok" in m for m in messages)
    assert any(
        m.startswith(
            f"request mqtt {helpers.BASE}/start requestId=None -> error bad_payload: invalid JSON"
        )
        for m in messages
    )
    for secret in ("env-secret-456", "file-secret-123"):
        assert secret not in daemon.log
        assert secret not in json.dumps(answer)


async def test_broker_tls_with_client_certificate_and_password(
    tls_broker: Any, simulator: QrsSimulator, sim_state: SimState, tmp_path: Path
) -> None:
    broker, tls_port, folder = tls_broker
    config = daemon_config(broker, simulator, mqtt=tls_settings(tls_port, folder, "pw-789"))
    daemon = Daemon(tmp_path / "tls-daemon", config)
    await daemon.start()
    try:
        async with Client(broker) as client:
            answer = await client.request(f"{helpers.BASE}/start/id/{SALES}")
        assert answer == reply("ok", [line(sim_state, SALES, ["id"], "started")])
    finally:
        await daemon.stop()
    assert "pw-789" not in daemon.log


async def test_wrong_broker_password_is_retried_and_logged(
    tls_broker: Any, simulator: QrsSimulator, tmp_path: Path
) -> None:
    broker, tls_port, folder = tls_broker
    config = daemon_config(broker, simulator, mqtt=tls_settings(tls_port, folder, "wrong-pw"))
    daemon = Daemon(tmp_path / "tls-daemon", config)
    await daemon.start(wait_ready=False)
    try:
        await wait_until(
            lambda: daemon.log.count("Not authorized") >= 2,
            what="two refused connection attempts in the log",
        )
        assert daemon.log.count("reconnecting in at most") >= 2
        assert daemon.process is not None and daemon.process.returncode is None
        assert daemon.notify is not None
        assert not any("READY=1" in m for m in daemon.notify.messages)
    finally:
        await daemon.stop()
    assert "wrong-pw" not in daemon.log


async def test_daemon_pings_the_watchdog_and_reports_status(make_daemon: Any) -> None:
    daemon: Daemon = await make_daemon(start=False)
    await daemon.start(env={"WATCHDOG_USEC": "400000"})
    assert daemon.notify is not None
    seen = len(daemon.notify.messages)
    await daemon.notify.wait_for("WATCHDOG=1", after=seen)
    await daemon.notify.wait_for("WATCHDOG=1", after=len(daemon.notify.messages))
    ready = next(m for m in daemon.notify.messages if "READY=1" in m)
    assert ready.splitlines() == [
        "READY=1",
        f"STATUS=serving {helpers.BASE}/start on 127.0.0.1:{daemon.config['mqtt']['port']}",
    ]
    await daemon.stop()


async def test_qrs_certificate_is_verified_unless_configured_off(
    make_daemon: Any, mqtt: Client, sim_state: SimState, tmp_path: Path
) -> None:
    foreign = tmp_path / "foreign-root.pem"
    trustme.CA().cert_pem.write_to_path(str(foreign))
    strict: Daemon = await make_daemon(start=False, qrs={"ca_file": str(foreign)})
    await strict.start(wait_ready=False)
    await wait_until(
        lambda: (
            "QRS not ready: TLS verification of" in strict.log
            and "connected to broker" in strict.log
        ),
        what="the daemon to refuse the unverified QRS, and to subscribe",
    )
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{SALES}")
    assert answer["error"]["code"] == "qrs_unavailable"
    assert sim_state.started == []
    await strict.stop()

    lax: Daemon = await make_daemon(qrs={"ca_file": str(foreign), "insecure": True})
    assert "qrs.insecure is true: the QRS server certificate is NOT verified" in lax.log
    assert (await mqtt.request(f"{helpers.BASE}/start/id/{SALES}"))["status"] == "ok"


@pytest.mark.parametrize("section", ["mqtt", "qrs"])
async def test_a_corrupt_certificate_is_a_configuration_error(
    make_daemon: Any, tmp_path: Path, section: str
) -> None:
    garbage = tmp_path / "client.pem"
    garbage.write_text("not a certificate\n")
    files = {"cert_file": str(garbage), "key_file": str(garbage)}
    daemon: Daemon = await make_daemon(
        start=False,
        **({"mqtt": {"tls": {"enabled": True, **files}}} if section == "mqtt" else {"qrs": files}),
    )
    await daemon.start(wait_ready=False)
    assert await daemon.wait() == 78
    key = "mqtt.tls.cert_file" if section == "mqtt" else "qrs.cert_file"
    expected = f"{key}: {garbage} (with {garbage}) cannot be used"
    assert f"mqtt-starter: invalid configuration:\n  {expected}" in daemon.log
    assert "Traceback" not in daemon.log
    assert daemon.notify is not None
    assert not any("READY=1" in m for m in daemon.notify.messages)


async def test_a_reload_of_qrs_settings_keeps_work_in_flight(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    daemon: Daemon = await make_daemon()
    assert daemon.notify is not None
    waiting, in_flight = "test/reload/wait", "test/reload/in-flight"
    await mqtt.subscribe(waiting, in_flight)
    await mqtt.publish(f"{helpers.BASE}/start/id/{LONG}", {"wait": True}, response_topic=waiting)
    [accepted] = await mqtt.wait_for(waiting)
    assert accepted.json()["tasks"][0]["result"] == "started"
    # QRS holds every call until the reload is done: the request's task lookup is in flight
    # through the whole reload.
    sim_state.faults.open.clear()
    await mqtt.publish(f"{helpers.BASE}/start/id/{SALES}", response_topic=in_flight)
    await wait_until(
        lambda: any(e.path == "/qrs/task/full" and e.ended is None for e in sim_state.journal),
        what="the request to be in flight",
    )
    config = dict(daemon.config)
    config["qrs"] = {**config["qrs"], "timeout_s": 7}
    daemon.write_config(config)
    seen = len(daemon.notify.messages)
    daemon.signal(signal.SIGHUP)
    await daemon.notify.wait_for("STATUS=configuration reloaded", after=seen)
    assert mqtt.on(in_flight) == []
    sim_state.faults.open.set()
    [answered] = await mqtt.wait_for(in_flight)
    assert answered.json() == reply("ok", [line(sim_state, SALES, ["id"], "started")])
    # The run started before the reload is still followed: its end reaches the waiting caller.
    assert sim_state.live_session(LONG) is not None
    sim_state.stop(sim_state.tasks[LONG])
    _, finished = await mqtt.wait_for(waiting, 2)
    [task] = finished.json()["tasks"]
    assert (finished.json()["stage"], task["state"], task["stateCode"]) == (
        "finished",
        "Aborted",
        6,
    )
    await wait_until(
        lambda: "the previous QRS client is closed" in daemon.log,
        what="the old QRS client to be closed once its follower ended",
    )
    assert "internal" not in answered.payload.decode() + finished.payload.decode()


async def test_a_reload_naming_a_corrupt_certificate_is_refused(
    make_daemon: Any, mqtt: Client, tmp_path: Path
) -> None:
    daemon: Daemon = await make_daemon()
    assert daemon.notify is not None
    garbage = tmp_path / "client.pem"
    garbage.write_text("not a certificate\n")
    config = dict(daemon.config)
    config["qrs"] = {**config["qrs"], "cert_file": str(garbage), "timeout_s": 9}
    daemon.write_config(config)
    seen = len(daemon.notify.messages)
    daemon.signal(signal.SIGHUP)
    await daemon.notify.wait_for("STATUS=reload refused: invalid configuration", after=seen)
    assert (
        f"reload refused, keeping the running configuration: qrs.cert_file: {garbage} (with"
        in daemon.log
    )
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{SALES}")
    assert answer["status"] == "ok"


async def test_a_corrupt_cloud_ca_file_exits_78_and_a_reload_naming_it_is_refused(
    tmp_path: Path, broker: Broker, mqtt: Client
) -> None:
    from mqtt_starter.simulators.certs import ensure_certificates
    from mqtt_starter.simulators.cloud.fixtures import load_cloud_fixture
    from mqtt_starter.simulators.cloud.server import CloudSimulator

    garbage = tmp_path / "ca.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    certs = ensure_certificates(tmp_path / "certs")
    sim = CloudSimulator(load_cloud_fixture(), certs)
    await sim.start()
    section = {"tenant_url": sim.url, "api_key": "sim-api-key", "ca_file": str(garbage)}
    broken = Daemon(tmp_path / "broken", site_config(broker, "cloud", section))
    good = Daemon(
        tmp_path / "good", site_config(broker, "cloud", {**section, "ca_file": str(certs.root)})
    )
    try:
        await broken.start(wait_ready=False)
        assert await broken.wait() == 78
        assert f"cloud.ca_file: {garbage} cannot be used" in broken.log
        assert "Traceback" not in broken.log

        await good.start()
        config = dict(good.config)
        config["cloud"] = {**config["cloud"], "ca_file": str(garbage)}
        good.write_config(config)
        good.signal(signal.SIGHUP)
        assert good.notify is not None
        await good.notify.wait_for("STATUS=reload refused: invalid configuration")
        assert (
            f"reload refused, keeping the running configuration: cloud.ca_file: {garbage}"
            in good.log
        )
        answer = await mqtt.request(f"{helpers.BASE}/start/name/Sales Dashboard", {"dryRun": True})
        assert [t["result"] for t in answer["tasks"]] == ["dry_run"]
    finally:
        await broken.stop()
        await good.stop()
        await sim.stop()


async def test_a_malformed_request_logs_one_line_and_no_secret(
    make_daemon: Any, tmp_path: Path
) -> None:
    """aiohttp logs a request whose header is too long with its traceback; with variable
    values in tracebacks the raw request, token included, would be in the log."""
    token = "s3cret-token-0123456789"
    port = free_port()
    daemon: Daemon = await make_daemon(
        http={"enabled": True, "port": port, "token": token}, log={"level": "INFO"}
    )
    request = (
        f"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"X-Filler: {'a' * 9000}\r\n\r\n"
    ).encode()
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        answer = await reader.read()  # aiohttp answers 400 and closes
        writer.close()
        assert answer.split(b" ", 2)[1] == b"400"
    await wait_until(lambda: "HTTP: a malformed request was refused" in daemon.log, what="a line")
    status, _ = await http_get(port, "/healthz", token)
    assert status == 200
    await daemon.stop()
    assert token not in daemon.log
    lines = [line for line in daemon.log.splitlines() if "malformed request" in line]
    assert len(lines) == 1, lines  # 20 malformed requests, one line: rate-limited
    assert "Traceback" not in daemon.log


async def http_get(port: int, path: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}", headers=headers) as response,
    ):
        return response.status, await response.text()


async def test_unfinished_connections_do_not_take_the_endpoint_down(make_daemon: Any) -> None:
    """1,100 connections that never finish their headers, under systemd's default limit of
    1,024 files: the oldest idle ones make room, /healthz answers, and the log stays short."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:  # the test's own side of 1,100 connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    port = free_port()
    daemon: Daemon = await make_daemon(
        start=False, http={"enabled": True, "port": port, "request_timeout_s": 600}
    )
    await daemon.start(nofile=1024)
    slow: list[asyncio.StreamWriter] = []
    try:
        for _ in range(1100):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the end
            slow.append(writer)
        await asyncio.gather(*(w.drain() for w in slow))
        status, text = await http_get(port, "/healthz")
        assert (status, text) == (200, '{"status": "alive"}')
        assert daemon.alive
    finally:
        for writer in slow:
            writer.close()
    await daemon.stop()
    http_lines = [line for line in daemon.log.splitlines() if "HTTP:" in line]
    assert 1 <= len(http_lines) <= 3, http_lines  # rate-limited, not one per connection
    assert "Traceback" not in daemon.log


async def test_a_connection_that_does_not_finish_its_request_is_closed(make_daemon: Any) -> None:
    port = free_port()
    await make_daemon(http={"enabled": True, "port": port, "request_timeout_s": 0.2})
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the daemon, unanswered
    writer.close()
    assert await http_get(port, "/healthz") == (200, '{"status": "alive"}')


@pytest.mark.parametrize("memory", ["kept", "deleted"])
async def test_a_wait_in_flight_survives_a_restart(
    make_daemon: Any, mqtt: Client, sim_state: SimState, memory: str
) -> None:
    """SIGTERM while a `wait` follows a run, then a new daemon: the new one sends the finished
    reply; with the run's memory deleted meanwhile, it says Unknown and why."""
    old: Daemon = await make_daemon()
    reply_topic = "test/reply/restart"
    await mqtt.subscribe(reply_topic)
    await mqtt.publish(
        f"{helpers.BASE}/start/id/{LONG}",
        {"requestId": "across", "wait": True},
        response_topic=reply_topic,
        correlation=b"corr-7",
    )
    [accepted] = await mqtt.wait_for(reply_topic)
    [task] = accepted.json()["tasks"]
    assert task["result"] == "started"
    execution_id = task["executionId"]
    # The memory is on the broker before the daemon stops.
    await mqtt.subscribe(
        f"{helpers.BASE}/following/{helpers.INSTANCE}/+",
        f"{helpers.BASE}/wait/{helpers.INSTANCE}/+",
    )
    await mqtt.wait_for(f"{helpers.BASE}/wait/{helpers.INSTANCE}/+")
    [run] = await mqtt.wait_for(f"{helpers.BASE}/following/{helpers.INSTANCE}/{execution_id}")
    assert run.json() == {
        "key": run.json()["key"],
        "taskId": LONG,
        "taskName": "Long Reload",
        "executionId": execution_id,
    }
    old.signal(signal.SIGTERM)
    assert await old.wait() == 0
    if memory == "deleted":
        await mqtt.publish(
            f"{helpers.BASE}/following/{helpers.INSTANCE}/{execution_id}", b"", retain=True
        )
    new: Daemon = await make_daemon()
    await wait_until(lambda: "resuming the wait of requestId=across" in new.log, what="resume")
    sim_state.stop(sim_state.tasks[LONG])  # the run ends (Aborted) under the new daemon
    [_, finished] = await mqtt.wait_for(reply_topic, count=2)
    assert finished.correlation == b"corr-7"
    data = finished.json()
    [end] = data["tasks"]
    assert (data["requestId"], data["stage"], data["status"]) == ("across", "finished", "error")
    if memory == "kept":
        assert (end["state"], end["stateCode"], end["executionId"]) == (
            "Aborted",
            6,
            execution_id,
        )
    else:
        assert end["state"] == "Unknown"
        assert end["error"] == (
            "the daemon restarted, and no memory of this run was left to follow it by"
        )
    # Once answered, the memory is cleared.
    await mqtt.wait_for(
        f"{helpers.BASE}/wait/{helpers.INSTANCE}/+", until=lambda r: r.payload == b""
    )
    if memory == "kept":
        await mqtt.wait_for(
            f"{helpers.BASE}/following/{helpers.INSTANCE}/{execution_id}",
            until=lambda r: r.payload == b"",
        )
