"""`mqtt-starter trigger` against a real broker and the daemon: every exit code of DESIGN.md
section 5, the request it sends, and what it prints."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from mqtt_starter.commands.trigger import Ask, trigger
from mqtt_starter.config import MqttSettings
from mqtt_starter.simulators.qrs.state import SimState
from tests.conftest import free_port
from tests.integration import helpers
from tests.integration.conftest import Broker, Client, LocalDaemon, cli
from tests.integration.helpers import ARCHIVE, FORECAST, LONG, SALES, STOCK


def broker_settings(broker: Broker, **values: Any) -> MqttSettings:
    return MqttSettings.model_validate(
        {"host": "127.0.0.1", "port": broker.port, "base_topic": broker.base, **values}
    )


async def run(broker: Broker, ask: Ask, **options: Any) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await trigger(broker_settings(broker), ask, out=out, err=err, **options)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
async def daemon(make_local_daemon: Any) -> LocalDaemon:
    d: LocalDaemon = await make_local_daemon()
    return d


async def test_everything_started_is_0_and_the_request_is_as_documented(
    daemon: LocalDaemon, broker: Broker, mqtt: Client, sim_state: SimState
) -> None:
    await mqtt.subscribe(f"{helpers.BASE}/start")
    code, out, err = await run(broker, Ask(task_ids=[SALES], tags=["Fragile"]))
    assert (code, err) == (0, "")
    [request] = mqtt.on(f"{helpers.BASE}/start")
    sent = request.json()
    assert sent == {
        "requestId": sent["requestId"],
        "taskIds": [SALES],
        "tags": ["Fragile"],
    }
    assert sent["requestId"].startswith("trigger-")
    assert out.splitlines() == [
        "accepted: ok",
        f"  started           Reload Sales ({SALES})",
        f"  started           Reload Forecast ({FORECAST})",
    ]
    assert sorted(sim_state.started) == sorted([SALES, FORECAST])


async def test_with_wait_every_run_succeeding_is_0(daemon: LocalDaemon, broker: Broker) -> None:
    code, out, _ = await run(broker, Ask(task_ids=[STOCK], wait=True), as_json=True)
    assert code == 0
    accepted, finished = (json.loads(line) for line in out.splitlines())
    assert (accepted["stage"], finished["stage"], finished["status"]) == (
        "accepted",
        "finished",
        "ok",
    )
    assert finished["tasks"][0]["state"] == "FinishedSuccess"


async def test_with_wait_a_failed_run_is_1(daemon: LocalDaemon, broker: Broker) -> None:
    code, out, _ = await run(broker, Ask(task_ids=[FORECAST], wait=True))
    assert code == 1
    assert out.splitlines()[-2:] == [
        "finished: error",
        f"  FinishedFail      Reload Forecast ({FORECAST}): Field 'Amount' not found",
    ]


async def test_not_everything_started_is_2(daemon: LocalDaemon, broker: Broker) -> None:
    code, out, _ = await run(broker, Ask(task_ids=[ARCHIVE], names=["No such task"]))
    assert code == 2
    assert out.splitlines() == [
        "accepted: error",
        f"  disabled          Reload Archive ({ARCHIVE})",
        "  unmatched         name:No such task: not_found",
    ]


async def test_a_wait_that_times_out_is_3(
    daemon: LocalDaemon, broker: Broker, sim_state: SimState
) -> None:
    code, out, _ = await run(broker, Ask(task_ids=[LONG], wait=True, timeout_s=0.5))
    assert code == 3
    assert "(timed out)" in out.splitlines()[-1]
    sim_state.stop(sim_state.tasks[LONG])


async def test_no_daemon_is_4(broker: Broker) -> None:
    code, out, err = await run(broker, Ask(tags=["Nightly"]), reply_timeout_s=0.3)
    assert (code, out) == (4, "")
    assert err == (
        f"mqtt-starter trigger: no daemon answered on {helpers.BASE}/start within 0.3 s"
        f" (broker 127.0.0.1:{broker.port})\n"
    )


async def test_no_broker_is_4() -> None:
    port = free_port()
    out, err = io.StringIO(), io.StringIO()
    settings = MqttSettings.model_validate({"host": "127.0.0.1", "port": port})
    code = await trigger(settings, Ask(tags=["Nightly"]), out=out, err=err)
    assert code == 4
    assert err.getvalue().startswith(f"mqtt-starter trigger: the broker 127.0.0.1:{port} cannot")


async def test_mqtt_3_1_1_gets_its_replies_through_reply_to(
    daemon: LocalDaemon, broker: Broker
) -> None:
    out, err = io.StringIO(), io.StringIO()
    settings = broker_settings(broker, protocol="3.1.1")
    code = await trigger(settings, Ask(task_ids=[SALES], dry_run=True), out=out, err=err)
    assert code == 0
    assert out.getvalue().splitlines()[1] == f"  dry_run           Reload Sales ({SALES})"


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ((), "mqtt-starter trigger: say what to start: --id, --tag, --cp, --name or --space"),
        (("--tag", "x", "--nonsense"), "unrecognized arguments: --nonsense"),
        (("--cp", "no-equals-sign"), "--cp 'no-equals-sign': expected NAME=VALUE"),
    ],
)
async def test_bad_arguments_are_78_with_a_usage_line(args: tuple[str, ...], why: str) -> None:
    code, out, err = await cli("trigger", *args)
    assert code == 78
    assert why in err and out == ""
    if "--cp" not in args:
        assert err.startswith("usage: mqtt-starter")


async def test_the_broker_from_a_configuration_and_the_flags(
    daemon: LocalDaemon, broker: Broker, tmp_path: Path
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"mqtt: {{host: 127.0.0.1, port: {broker.port}, base_topic: {broker.base}}}\n"
        "qrs: {url: https://sense:4242}\n"
    )
    code, out, err = await cli("trigger", "-c", str(config), "--id", SALES, "--dry-run")
    assert (code, out.splitlines()[:1], err) == (0, ["accepted: ok"], "")
    code, out, _ = await cli(
        "trigger",
        "--broker",
        f"127.0.0.1:{broker.port}",
        "--base-topic",
        broker.base,
        "--name",
        "Reload Stock",
        "--json",
    )
    assert code == 0
    assert json.loads(out)["tasks"][0]["taskId"] == STOCK
