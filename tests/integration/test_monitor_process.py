"""What only processes show of the monitor: runs that end while it is dead are published once
after the restart, and a second instance takes over when the monitoring one is killed."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.qrs.server import QrsSimulator
from mqtt_starter.simulators.qrs.state import SimState
from tests.integration.conftest import Broker, Client, Daemon, daemon_config
from tests.integration.test_monitor import FAIL, OK, fire_and_end, monitor_fixture

MONITOR = {"enabled": True, "interval_s": 0.2, "overlap_s": 2, "lookback_s": 60}


@pytest.fixture
async def simulator(certs: CertPaths) -> AsyncIterator[QrsSimulator]:
    sim = QrsSimulator(monitor_fixture(), certs)
    await sim.start()
    yield sim
    await sim.stop()


def process(tmp_path: Path, broker: Broker, sim: QrsSimulator, client_id: str) -> Daemon:
    config = daemon_config(broker, sim, monitor=MONITOR)
    config["mqtt"]["client_id"] = client_id
    config["mqtt"]["keepalive_s"] = 5
    return Daemon(tmp_path / client_id, config)


def terminal_events(mqtt: Client) -> Counter[tuple[str, str]]:
    """(executionId, state) of every final-state status event, with how often it came."""
    return Counter(
        (r.json()["executionId"], r.json()["state"])
        for r in mqtt.on("butler/status/task/+")
        if r.json()["state"] in ("FinishedSuccess", "FinishedFail")
    )


async def state_is(mqtt: Client, task_id: str, execution_id: str, state: str) -> None:
    await mqtt.wait_for(
        f"butler/state/task/{task_id}",
        until=lambda r: r.json()["executionId"] == execution_id and r.json()["state"] == state,
        timeout=30,
    )


async def test_runs_that_end_while_the_daemon_is_dead_are_published_once(
    tmp_path: Path, private_broker: Broker, simulator: QrsSimulator, sim_state: SimState
) -> None:
    daemon = process(tmp_path, private_broker, simulator, "starter-test")
    try:
        async with Client(private_broker) as mqtt:
            await mqtt.subscribe("butler/status/task/+", "butler/state/task/+", "butler/event/#")
            await daemon.start()
            before = await fire_and_end(sim_state, OK)
            await state_is(mqtt, OK, before, "FinishedSuccess")
            await daemon.kill()  # SIGKILL: nothing is said or flushed

            while_dead = [await fire_and_end(sim_state, OK) for _ in range(2)]
            failed = await fire_and_end(sim_state, FAIL)

            await daemon.start()
            await state_is(mqtt, OK, while_dead[-1], "FinishedSuccess")
            await state_is(mqtt, FAIL, failed, "FinishedFail")
            await mqtt.wait_for("butler/event/task/failed")
            # One more run after the restart: once it is out, everything before it is too.
            after = await fire_and_end(sim_state, OK)
            await state_is(mqtt, OK, after, "FinishedSuccess")

            finals = terminal_events(mqtt)
            assert finals == {
                (before, "FinishedSuccess"): 1,
                (while_dead[0], "FinishedSuccess"): 1,
                (while_dead[1], "FinishedSuccess"): 1,
                (failed, "FinishedFail"): 1,
                (after, "FinishedSuccess"): 1,
            }
            events = [r.json()["executionId"] for r in mqtt.on("butler/event/#")]
            assert events == [failed]
    finally:
        await daemon.stop()


async def test_one_instance_monitors_and_the_next_takes_over_when_it_dies(
    tmp_path: Path, private_broker: Broker, simulator: QrsSimulator, sim_state: SimState
) -> None:
    first = process(tmp_path, private_broker, simulator, "starter-a")
    second = process(tmp_path, private_broker, simulator, "starter-b")
    try:
        async with Client(private_broker) as mqtt:
            await mqtt.subscribe("butler/info/+", "butler/status/task/+", "butler/state/task/+")
            await first.start()
            await mqtt.wait_for("butler/info/starter-a", until=lambda r: r.json()["monitoring"])
            await second.start()
            await mqtt.wait_for(
                "butler/info/starter-b", until=lambda r: r.json()["monitor"], timeout=30
            )

            early = [await fire_and_end(sim_state, OK) for _ in range(2)]
            await state_is(mqtt, OK, early[-1], "FinishedSuccess")
            # Only the first instance monitored: the second never said it did.
            assert not [r for r in mqtt.on("butler/info/starter-b") if r.json()["monitoring"]]

            handover = asyncio.get_running_loop().time()
            await first.kill()
            during = await fire_and_end(sim_state, FAIL)
            await mqtt.wait_for("butler/info/starter-b", until=lambda r: r.json()["monitoring"])
            took_over_s = asyncio.get_running_loop().time() - handover
            late = [await fire_and_end(sim_state, OK) for _ in range(2)]
            await state_is(mqtt, FAIL, during, "FinishedFail")
            await state_is(mqtt, OK, late[-1], "FinishedSuccess")

            finals = terminal_events(mqtt)
            runs = [*early, during, *late]
            # No run is lost; only a run that ended around the handover may come twice.
            assert set(finals) == {
                (e, "FinishedFail" if e == during else "FinishedSuccess") for e in runs
            }
            duplicates = {k: n for k, n in finals.items() if n > 1}
            assert set(duplicates) <= {(during, "FinishedFail")}, duplicates
            assert all(finals[(e, "FinishedSuccess")] == 1 for e in late)
            print(f"takeover after {took_over_s:.3f} s, duplicates: {duplicates}")
    finally:
        await first.stop()
        await second.stop()


async def test_runs_started_by_the_instance_that_does_not_monitor_are_published_once(
    tmp_path: Path, private_broker: Broker, simulator: QrsSimulator, sim_state: SimState
) -> None:
    first = process(tmp_path, private_broker, simulator, "starter-a")
    second = process(tmp_path, private_broker, simulator, "starter-b")
    for daemon in (first, second):
        daemon.config["mqtt"]["shared_group"] = "starters"  # each request goes to one of them
    try:
        async with Client(private_broker) as mqtt:
            await mqtt.subscribe("butler/info/+", "butler/status/task/+", "butler/state/task/+")
            await first.start()
            await mqtt.wait_for("butler/info/starter-a", until=lambda r: r.json()["monitoring"])
            await second.start()
            await mqtt.wait_for("butler/info/starter-b", until=lambda r: r.json()["monitor"])
            replies = [
                await mqtt.request(f"butler/start/id/{task}", {"requestId": f"r-{task[-1]}"})
                for task in (OK, FAIL)
            ]
            # Round robin: one request each, so one run was started by the instance that
            # does not monitor.
            assert sorted(r["instance"] for r in replies) == ["starter-a", "starter-b"]
            runs = {r["tasks"][0]["executionId"]: r["requestId"] for r in replies}
            for task, reply in zip((OK, FAIL), replies, strict=True):
                final = "FinishedSuccess" if task == OK else "FinishedFail"
                await state_is(mqtt, task, reply["tasks"][0]["executionId"], final)
            events = [r.json() for r in mqtt.on("butler/status/task/+")]
            seen = Counter((e["executionId"], e["state"]) for e in events)
            assert all(n == 1 for n in seen.values()), seen
            assert {(e["executionId"], e["startedBy"], e["requestId"]) for e in events} == {
                (execution, "mqtt-starter", request) for execution, request in runs.items()
            }
    finally:
        await first.stop()
        await second.stop()
