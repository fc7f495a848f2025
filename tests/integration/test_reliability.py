"""The promises of DESIGN.md section 3 under faults and load. Figures are printed (run with -s)
and recorded as test properties."""

from __future__ import annotations

import asyncio
import random
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from mqtt_starter.simulators.qrs.fixtures import Fixture
from mqtt_starter.simulators.qrs.state import SimState
from tests.conftest import wait_until
from tests.integration.conftest import Broker, Client, Daemon
from tests.integration.helpers import many_task_ids, many_tasks

LOAD = many_task_ids(250, 0xC0)
# Triggers published while QRS holds every call: a backlog many times mqtt.max_in_flight.
OVERLOAD = 600
IN_FLIGHT = 10
RecordProperty = Any

# Every promise here holds on both event loops the daemon may run on.
pytestmark = pytest.mark.usefixtures("daemon_loop")


@pytest.fixture
def broker(private_broker: Broker) -> Broker:
    """These tests stop or kill the broker: each has one of its own."""
    return private_broker


@pytest.fixture(scope="module")
def task_fixture() -> Fixture:
    # Long executions: a trigger delivered again after a crash finds its task running.
    return many_tasks("Load", 250, 0xC0, duration_s=120)


def rss_kib(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    assert match is not None
    return int(match.group(1))


async def publish_reliably(broker: Broker, topic: str, payload: dict[str, Any]) -> None:
    """Publish at QoS 1 until the broker acknowledged it, across broker restarts."""
    while True:
        try:
            async with Client(broker) as client:
                await client.publish(topic, payload)
            return
        except aiomqtt.MqttError:
            await asyncio.sleep(0.05)  # retry pacing of a publisher, not synchronisation


@pytest.mark.slow
async def test_sigkill_at_random_moments_loses_no_trigger(
    make_daemon: Any, mqtt: Client, sim_state: SimState, record_property: RecordProperty
) -> None:
    rng = random.Random(20261129)
    daemon: Daemon = await make_daemon()
    kills = 0

    async def killer() -> None:
        nonlocal kills
        for _ in range(5):
            await asyncio.sleep(rng.uniform(0.2, 0.8))  # the fault schedule
            await daemon.kill()
            kills += 1
            await daemon.start()

    chaos = asyncio.create_task(killer())
    for i in range(200):
        await mqtt.publish(f"butler/start/name/Load {i:03d}", {"requestId": f"crash-{i}"})
        await asyncio.sleep(0.02)  # a stream, not a burst, so the kills land inside it
    await chaos
    wanted = set(LOAD[:200])
    await wait_until(
        lambda: wanted <= set(sim_state.started), timeout=60, what="every trigger to get its start"
    )
    duplicates = len(sim_state.started) - len(set(sim_state.started))
    record_property("kills", kills)
    record_property("duplicate_starts", duplicates)
    print(
        f"\ncrash test: {kills} kills, 200 triggers, {len(set(sim_state.started))} tasks"
        f" started, {duplicates} duplicate starts"
    )
    assert set(sim_state.started) == wanted
    # Every redelivered trigger finds its task still running (120 s runs): no task starts
    # twice, whatever the kills hit.
    assert duplicates == 0


@pytest.mark.slow
async def test_broker_killed_three_times_during_a_stream(
    make_daemon: Any, broker: Broker, sim_state: SimState, record_property: RecordProperty
) -> None:
    daemon: Daemon = await make_daemon()
    rng = random.Random(7)

    async def stream() -> None:
        for i in range(90):
            await publish_reliably(
                broker, f"butler/start/name/Load {i:03d}", {"requestId": f"broker-{i}"}
            )
            await asyncio.sleep(0.02)

    publisher = asyncio.create_task(stream())
    for kill in range(1, 4):
        await asyncio.sleep(rng.uniform(0.3, 0.6))  # the fault schedule
        broker.stop(signal.SIGKILL)
        broker.start()
        # One fault at a time: the next kill comes only after the daemon is back.
        await wait_until(
            lambda k=kill: bool(daemon.log.count("connected to broker") == k + 1),  # type: ignore[misc]
            timeout=30,
            what=f"the daemon to reconnect after kill {kill}",
        )
    await publisher
    wanted = set(LOAD[:90])
    await wait_until(
        lambda: wanted <= set(sim_state.started),
        timeout=60,
        what="every trigger of the stream to get its start",
    )
    assert set(sim_state.started) == wanted
    waits = [float(w) for w in re.findall(r"reconnecting in at most ([\d.]+)s", daemon.log)]
    record_property("reconnect_waits_s", waits)
    assert waits and max(waits) <= daemon.config["mqtt"]["reconnect"]["max_s"]
    async with Client(broker) as client:
        await client.subscribe("butler/availability/starter-test")
        [online] = await client.wait_for("butler/availability/starter-test")
    assert (online.payload, online.retain) == (b"online", True)


@pytest.mark.slow
async def test_qrs_faults_retried_within_bounds_then_unavailable(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    daemon: Daemon = await make_daemon(qrs={"max_concurrency": 3, "timeout_s": 0.5})
    sim_state.faults.delay_s = 0.05
    await mqtt.subscribe("butler/reply/#")
    for i in range(30):
        await mqtt.publish(f"butler/start/name/Load {i:03d}", {"requestId": f"q-{i}"})
    replies = await mqtt.wait_for("butler/reply/#", 30)
    assert {r.json()["status"] for r in replies} == {"ok"}
    assert sim_state.peak_in_flight <= 3
    sim_state.faults.delay_s = 0
    sim_state.faults.fail_next = 2
    assert (await mqtt.request("butler/start/name/Load 100"))["status"] == "ok"
    sim_state.faults.hang_next, sim_state.faults.hang_s = 1, 5
    assert (await mqtt.request("butler/start/name/Load 101"))["status"] == "ok"
    sim_state.faults.drop_next = 1
    assert (await mqtt.request("butler/start/name/Load 102"))["status"] == "ok"
    sim_state.faults.fail_next = 1000
    down = await mqtt.request("butler/start/name/Load 103", {"requestId": "down"})
    assert down["error"]["code"] == "qrs_unavailable"
    sim_state.faults.fail_next = 0
    back = await mqtt.request("butler/start/name/Load 103", {"requestId": "down"})
    assert back["status"] == "ok"
    assert daemon.process is not None and daemon.process.returncode is None
    assert sim_state.peak_in_flight <= 3


def message_id(pattern: str, line: str) -> str:
    found = re.search(pattern, line)
    assert found is not None, f"no message id in mosquitto's line {line!r}"
    return found.group(1)


def outstanding_peaks(log: str, daemon_id: str, start_prefix: str) -> tuple[int, int]:
    """From mosquitto's debug log (one line per packet, in the order it handled them): the
    most triggers the daemon held unacknowledged at once, and the most the broker held for it
    (received from publishers, not yet sent on)."""
    sent_to = f"Sending PUBLISH to {daemon_id} "
    acked_by = f"Received PUBACK from {daemon_id} "
    held = in_daemon = peak_held = peak_in_daemon = 0
    unacked: set[str] = set()
    for line in log.splitlines():
        if f"'{start_prefix}" in line and "PUBLISH" in line:
            if sent_to in line:
                unacked.add(message_id(r", m(\d+),", line))
                held -= 1
            elif "Received PUBLISH from" in line:
                held += 1
        elif acked_by in line:
            unacked.discard(message_id(r"Mid: (\d+)", line))
        in_daemon = len(unacked)
        peak_held, peak_in_daemon = max(peak_held, held), max(peak_in_daemon, in_daemon)
    return peak_in_daemon, peak_held


@pytest.mark.slow
async def test_overload_runs_at_most_max_in_flight_and_answers_every_trigger(
    broker: Broker, make_daemon: Any, sim_state: SimState, record_property: RecordProperty
) -> None:
    # A broker that logs each packet, so that the test sees where the backlog waits.
    broker.stop()
    broker.extra = "log_type debug\n"
    broker.start()
    daemon: Daemon = await make_daemon(
        log={"level": "WARNING"}, mqtt={"max_in_flight": IN_FLIGHT}, qrs={"max_concurrency": 32}
    )
    assert daemon.process is not None
    pid = daemon.process.pid
    sim_state.faults.delay_s = 0.05  # a slow QRS, once it answers at all
    async with Client(broker) as mqtt:
        await overload(mqtt, pid, broker, sim_state, record_property)


async def overload(
    mqtt: Client, pid: int, broker: Broker, sim_state: SimState, record_property: RecordProperty
) -> None:
    before = rss_kib(pid)
    peak = before
    await mqtt.subscribe("butler/reply/#")
    sampling = True

    async def sample() -> None:
        nonlocal peak
        while sampling:
            peak = max(peak, rss_kib(pid))
            await asyncio.sleep(0.1)  # the sampling rate of a measurement

    sampler = asyncio.create_task(sample())
    # QRS holds every call until the whole burst is on the broker and the daemon has as many
    # calls in hand as it may: the backlog then exists however fast this machine publishes.
    # (A daemon that takes more than it may fails on the peak below, not on this wait.)
    sim_state.faults.open.clear()
    started = time.monotonic()
    try:
        for i in range(OVERLOAD):
            await mqtt.publish(
                f"butler/start/name/Load {i % 250:03d}", {"requestId": f"o-{i}", "dryRun": True}
            )
        published = time.monotonic() - started
        await wait_until(lambda: sim_state.in_flight >= IN_FLIGHT, what="the calls QRS holds")
    finally:
        sim_state.faults.open.set()  # a failed wait must not leave the daemon's calls held
    replies = await mqtt.wait_for("butler/reply/#", OVERLOAD, timeout=300)
    answered = time.monotonic() - started
    sampling = False
    await sampler
    ids = {r.json()["requestId"] for r in replies}
    in_daemon, in_broker = outstanding_peaks(broker.log, broker.client_id, "butler/start/")
    growth_mib = (peak - before) / 1024
    record_property("rss_before_mib", before / 1024)
    record_property("rss_peak_mib", peak / 1024)
    print(
        f"\noverload: {OVERLOAD} triggers published in {published:.1f} s, all answered after"
        f" {answered:.1f} s; at most {in_daemon} in the daemon and {in_broker} in the broker;"
        f" RSS {before / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB"
    )
    assert ids == {f"o-{i}" for i in range(OVERLOAD)}
    assert sim_state.started == []
    # The whole burst waited, and never more than mqtt.max_in_flight were handled at once.
    # Where the backlog waits is the broker's choice: Debian 12's mosquitto (2.0.11) sends
    # beyond the Receive Maximum (eclipse-mosquitto#2301), and the excess waits in the
    # daemon unacknowledged, without a handler; a broker that honours it keeps all of it.
    assert in_daemon + in_broker >= OVERLOAD
    assert sim_state.peak_in_flight == IN_FLIGHT
    assert growth_mib < 40


async def test_a_killed_member_of_a_shared_group(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    first: Daemon = await make_daemon(mqtt={"shared_group": "g", "client_id": "member-a"})
    await make_daemon(mqtt={"shared_group": "g", "client_id": "member-b"})
    await mqtt.subscribe("butler/reply/#")
    await first.kill()
    for i in range(6):
        await mqtt.publish(f"butler/start/name/Load {i:03d}", {"requestId": f"s-{i}"})
    # The survivor serves its share at once; mosquitto keeps dealing the dead member its
    # share, which waits in that member's persistent session.
    served = await mqtt.wait_for("butler/reply/#", 3)
    assert {r.json()["instance"] for r in served} == {"member-b"}
    await first.start()
    replies = await mqtt.wait_for("butler/reply/#", 6)
    assert sorted(r.json()["requestId"] for r in replies) == [f"s-{i}" for i in range(6)]
    assert {r.json()["instance"] for r in replies} == {"member-a", "member-b"}
    assert sorted(sim_state.started) == sorted(LOAD[:6])


@pytest.mark.slow
async def test_sigterm_during_a_burst_leaves_nothing_half_done(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    daemon: Daemon = await make_daemon(qrs={"max_concurrency": 2})
    sim_state.faults.delay_s = 0.03
    await mqtt.subscribe("butler/reply/#")
    for i in range(50):
        await mqtt.publish(f"butler/start/name/Load {i:03d}", {"requestId": f"t-{i}"})
    await mqtt.wait_for("butler/reply/#", 5)
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait() == 0
    answered_before = len(mqtt.on("butler/reply/#"))
    await daemon.start()
    replies = await mqtt.wait_for("butler/reply/#", 50, timeout=60)
    by_id: dict[str, int] = {}
    for reply in mqtt.on("butler/reply/#"):
        by_id[reply.json()["requestId"]] = by_id.get(reply.json()["requestId"], 0) + 1
    print(
        f"\nSIGTERM during a burst: {answered_before} answered before the stop,"
        f" {50 - answered_before} after the restart"
    )
    assert len(replies) == 50
    assert by_id == {f"t-{i}": 1 for i in range(50)}  # no request answered twice
    assert {r.json()["status"] for r in replies} == {"ok"}
    assert sorted(sim_state.started) == sorted(LOAD[:50])  # each started exactly once
