"""Watching every run (DESIGN.md section 7) with the simulator as a real server and a real
broker: runs nobody started through the API, scope, deleted tasks, runs the daemon started,
the cost of a quiet interval, info and health."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mqtt_starter.core.monitoring import log_tail
from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.qrs.fixtures import Fixture, Outcome, TaskFixture, Variants
from mqtt_starter.simulators.qrs.server import QrsSimulator
from mqtt_starter.simulators.qrs.state import SimState
from mqtt_starter.sites import base as backend
from mqtt_starter.sites.qrs import QrsClient
from tests.conftest import LoggedExceptions, free_port, wait_until
from tests.integration import helpers
from tests.integration.conftest import Broker, Client, LocalDaemon, daemon_config, daemons

OK = "0a000000-0000-4000-8000-000000000001"
FAIL = "0a000000-0000-4000-8000-000000000002"
EXTERNAL = "0a000000-0000-4000-8000-000000000003"
OUTSIDE = "0a000000-0000-4000-8000-000000000004"
GONE = "0a000000-0000-4000-8000-000000000005"
SLOW = "0a000000-0000-4000-8000-000000000006"
ERROR = "Field 'Amount' not found"


def monitor_fixture() -> Fixture:
    def task(task_id: str, name: str, **options: Any) -> TaskFixture:
        return TaskFixture.model_validate({"id": task_id, "name": name, **options})

    return Fixture(
        tasks=[
            task(OK, "Nightly Sales", tags=["Nightly"], customProperties={"group": "a"},
                 outcome=Outcome(duration_s=0.05)),
            task(FAIL, "Nightly Forecast", tags=["Nightly"], app="Forecast",
                 outcome=Outcome(duration_s=0.05, result="fail", message=ERROR, log_lines=60)),
            task(EXTERNAL, "Export", type="external", tags=["Nightly"],
                 outcome=Outcome(duration_s=0.05, result="fail", message="exit code 3")),
            task(OUTSIDE, "Ad hoc", tags=["Adhoc"], outcome=Outcome(duration_s=0.05)),
            task(GONE, "Retired", tags=["Nightly"], outcome=Outcome(duration_s=0.05)),
            task(SLOW, "Long Haul", tags=["Adhoc"], outcome=Outcome(duration_s=3600)),
        ]
    )  # fmt: skip


@pytest.fixture
async def simulator(certs: CertPaths) -> AsyncIterator[QrsSimulator]:
    sim = QrsSimulator(monitor_fixture(), certs)
    await sim.start()
    yield sim
    await sim.stop()


MONITOR = {"enabled": True, "interval_s": 0.1, "overlap_s": 2, "lookback_s": 60}


@pytest.fixture
async def make_daemon(broker: Broker, simulator: QrsSimulator) -> AsyncIterator[Any]:
    async with daemons(
        LocalDaemon, lambda **sections: daemon_config(broker, simulator, **sections)
    ) as make:
        yield make


async def monitoring(
    make_daemon: Any,
    mqtt: Client,
    chains: list[Any] | None = None,
    sections: dict[str, Any] | None = None,
    **monitor: Any,
) -> LocalDaemon:
    """A daemon that watches every run, once it says so on its info topic; `sections`: more
    of its configuration."""
    await mqtt.subscribe(f"{helpers.BASE}/info/+")
    daemon: LocalDaemon = await make_daemon(
        monitor={**MONITOR, **monitor}, chains=chains or [], **(sections or {})
    )
    await mqtt.wait_for(
        f"{helpers.BASE}/info/{helpers.INSTANCE}", until=lambda r: r.json()["monitoring"]
    )
    return daemon


async def watch(mqtt: Client) -> None:
    await mqtt.subscribe(
        f"{helpers.BASE}/status/task/+",
        f"{helpers.BASE}/state/task/+",
        f"{helpers.BASE}/event/task/+",
    )


async def fire_and_end(state: SimState, task_id: str) -> str:
    """A run that a schedule starts (no API call), waited for to its end in the simulator."""
    execution_id = state.fire(state.tasks[task_id])
    await wait_until(lambda: execution_id not in state.sessions, what=f"the run of {task_id}")
    return execution_id


def final(state: SimState, execution_id: str) -> dict[str, Any]:
    return state.executions[execution_id][-1]


def states_of(mqtt: Client, execution_id: str) -> list[str]:
    return [
        r.json()["state"]
        for r in mqtt.on(f"{helpers.BASE}/status/task/+")
        if r.json()["executionId"] == execution_id
    ]


def expected_state(state: SimState, execution_id: str, started_by: str = "other") -> dict[str, Any]:
    result = final(state, execution_id)
    task = result["_task"]
    names = {6: "Aborted", 7: "FinishedSuccess", 8: "FinishedFail"}
    return {
        "taskId": task.id,
        "taskName": task.spec.name,
        "state": names[result["status"]],
        "stateCode": result["status"],
        "executionId": execution_id,
        "startTime": result["startTime"],
        "stopTime": result["stopTime"],
        "durationMs": result["duration"],
        "startedBy": started_by,
        "updatedAt": result["modifiedDate"],
    }


async def test_scheduled_runs_are_published_with_state_and_failure_reason(
    make_daemon: Any, mqtt: Client, sim_state: SimState, broker: Broker
) -> None:
    await watch(mqtt)
    await monitoring(make_daemon, mqtt)
    ok = await fire_and_end(sim_state, OK)
    failed = await fire_and_end(sim_state, FAIL)
    await mqtt.wait_for(f"{helpers.BASE}/event/task/failed")
    await mqtt.wait_for(
        f"{helpers.BASE}/state/task/{FAIL}", until=lambda r: r.json()["executionId"] == failed
    )
    await mqtt.wait_for(
        f"{helpers.BASE}/state/task/{OK}", until=lambda r: r.json()["state"] != "Started"
    )

    # Status events: each state seen once, ending in the final one, from "other".
    for execution_id, last in ((ok, "FinishedSuccess"), (failed, "FinishedFail")):
        seen = states_of(mqtt, execution_id)
        assert seen[-1] == last and len(seen) == len(set(seen)), seen
    for event in mqtt.on(f"{helpers.BASE}/status/task/+"):
        assert (event.json()["startedBy"], event.json()["requestId"]) == ("other", None)

    # The failure event, with the tail of the script log as the reason.
    result = final(sim_state, failed)
    [event] = mqtt.on(f"{helpers.BASE}/event/task/+")
    assert event.topic == f"{helpers.BASE}/event/task/failed"
    assert event.json() == {
        "taskId": FAIL,
        "taskName": "Nightly Forecast",
        "taskType": "Reload",
        "appId": result["appID"],
        "appName": "Forecast",
        "executionId": failed,
        "state": "FinishedFail",
        "stateCode": 8,
        "startTime": result["startTime"],
        "stopTime": result["stopTime"],
        "durationMs": result["duration"],
        "startedBy": "other",
        "requestId": None,
        "tags": ["Nightly"],
        "customProperties": [],
        "details": [
            {
                "detailsType": d["detailsType"],
                "message": d["message"],
                "detailCreatedDate": d["detailCreatedDate"],
            }
            for d in result["details"]
        ],
        "reason": log_tail(sim_state.logs[result["id"]], 30),
    }
    reason = event.json()["reason"].splitlines()
    assert len(reason) == 30 and reason[-3].endswith(f"Error: {ERROR}")

    # A subscriber that comes later sees each task's last run at once.
    async with Client(broker) as late:
        await late.subscribe(f"{helpers.BASE}/state/task/+")
        got = await late.wait_for(f"{helpers.BASE}/state/task/+", count=2)
        assert {r.topic: r.json() for r in got} == {
            f"{helpers.BASE}/state/task/{OK}": expected_state(sim_state, ok),
            f"{helpers.BASE}/state/task/{FAIL}": expected_state(sim_state, failed),
        }
        assert all(r.retain for r in got)


async def test_an_external_program_fails_with_its_error_details(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    await watch(mqtt)
    await monitoring(make_daemon, mqtt)
    failed = await fire_and_end(sim_state, EXTERNAL)
    [event] = await mqtt.wait_for(f"{helpers.BASE}/event/task/failed")
    assert (event.json()["executionId"], event.json()["taskType"], event.json()["reason"]) == (
        failed,
        "ExternalProgram",
        "exit code 3",
    )
    # No script log was asked for: external programs have none.
    assert not [e for e in sim_state.journal if "scriptlog" in e.path]


async def test_scope_limits_what_is_published_and_what_is_read(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    await watch(mqtt)
    await monitoring(make_daemon, mqtt, scope={"tags": ["Nightly"]})
    await fire_and_end(sim_state, OUTSIDE)
    inside = await fire_and_end(sim_state, OK)
    # Changes are taken in order: once the later run is published, the earlier was judged.
    await mqtt.wait_for(
        f"{helpers.BASE}/state/task/{OK}", until=lambda r: r.json()["state"] == "FinishedSuccess"
    )
    assert {
        r.json()["taskId"] for r in mqtt.received if r.topic.startswith(f"{helpers.BASE}/s")
    } == {OK}
    assert states_of(mqtt, inside)[-1] == "FinishedSuccess"
    # Tasks are only ever read by id, for the runs that changed.
    reads = [e.query.get("filter", "") for e in sim_state.journal if e.path == "/qrs/task/full"]
    assert reads and all(r.startswith("id eq ") for r in reads), reads


async def test_scope_by_id_reads_no_task_outside_it(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    await watch(mqtt)
    await monitoring(make_daemon, mqtt, scope={"task_ids": [OK]})
    await fire_and_end(sim_state, OUTSIDE)
    await fire_and_end(sim_state, OK)
    await mqtt.wait_for(
        f"{helpers.BASE}/state/task/{OK}", until=lambda r: r.json()["state"] == "FinishedSuccess"
    )
    reads = [e.query.get("filter", "") for e in sim_state.journal if e.path == "/qrs/task/full"]
    assert reads and all(r == f"id eq {OK}" for r in reads), reads


async def test_a_deleted_task_has_its_state_cleared(
    make_daemon: Any, mqtt: Client, sim_state: SimState, broker: Broker
) -> None:
    await watch(mqtt)
    await monitoring(make_daemon, mqtt, deleted_check_s=0.2)
    await fire_and_end(sim_state, GONE)
    await fire_and_end(sim_state, OK)
    await mqtt.wait_for(
        f"{helpers.BASE}/state/task/{GONE}", until=lambda r: r.json()["state"] != "Started"
    )
    sim_state.delete(sim_state.tasks[GONE])
    await mqtt.wait_for(f"{helpers.BASE}/state/task/{GONE}", until=lambda r: r.payload == b"")
    async with Client(broker) as late:
        await late.subscribe(f"{helpers.BASE}/state/task/+")
        [kept] = await late.wait_for(f"{helpers.BASE}/state/task/+")
        assert kept.topic == f"{helpers.BASE}/state/task/{OK}"


async def test_a_run_the_daemon_started_is_published_once(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    await watch(mqtt)
    await monitoring(make_daemon, mqtt)
    reply = await mqtt.request(
        f"{helpers.BASE}/start/id/{FAIL}", {"requestId": "r-1", "wait": True}
    )
    assert reply["stage"] == "accepted"
    execution_id = reply["tasks"][0]["executionId"]
    [event] = await mqtt.wait_for(f"{helpers.BASE}/event/task/failed")
    await mqtt.wait_for(
        f"{helpers.BASE}/state/task/{FAIL}", until=lambda r: r.json()["state"] == "FinishedFail"
    )
    seen = states_of(mqtt, execution_id)
    assert seen[-1] == "FinishedFail" and len(seen) == len(set(seen)), seen
    for status in mqtt.on(f"{helpers.BASE}/status/task/+"):
        assert (status.json()["startedBy"], status.json()["requestId"]) == ("mqtt-starter", "r-1")
    assert (event.json()["startedBy"], event.json()["requestId"]) == ("mqtt-starter", "r-1")
    [state] = mqtt.on(f"{helpers.BASE}/state/task/{FAIL}")[-1:]
    assert state.json() == expected_state(sim_state, execution_id, "mqtt-starter")
    # The follower rode on the monitor's query: no query of its own.
    filters = [
        e.query.get("filter", "")
        for e in sim_state.journal
        if e.path == "/qrs/executionresult/full"
    ]
    assert filters and all(f.startswith("modifiedDate ge '") for f in filters), filters


async def test_a_quiet_interval_costs_one_query(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    daemon = await monitoring(make_daemon, mqtt)
    assert daemon.daemon is not None
    parts = daemon.daemon.parts
    tracker = parts.tracker
    # The first poll also measures how QRS reads filter dates (more queries, once): count
    # from a tick after it.
    await wait_until(lambda: parts.backend.date_note != "not measured yet", what="measured")
    calibrated = tracker.polls
    await wait_until(lambda: tracker.polls > calibrated, what="a tick after the measuring")
    sim_state.reset_journal()
    polls = tracker.polls
    await wait_until(lambda: tracker.polls >= polls + 5, what="five intervals")
    calls = [(e.method, e.path) for e in sim_state.journal]
    ticks = tracker.polls - polls
    assert set(calls) == {("GET", "/qrs/executionresult/full")}
    # One query a tick: a tick counted but not yet arrived, or arrived just after the
    # journal was cleared, is the only slack either way.
    assert ticks - 1 <= len(calls) <= ticks + 1


async def test_info_and_health(make_daemon: Any, mqtt: Client, broker: Broker) -> None:
    await monitoring(make_daemon, mqtt)
    # The info says how QRS reads filter dates once the monitor has asked (its first poll).
    await mqtt.wait_for(
        f"{helpers.BASE}/info/{helpers.INSTANCE}",
        until=lambda r: r.json()["qrs"]["dateFilter"] != "not measured yet",
    )
    async with Client(broker) as late:  # the info is retained: a late subscriber gets it
        await late.subscribe(f"{helpers.BASE}/info/+")
        [info] = await late.wait_for(f"{helpers.BASE}/info/{helpers.INSTANCE}")
    assert info.retain
    data = info.json()
    started_at = data.pop("startedAt")
    assert started_at.endswith("Z")
    assert data == {
        "instance": helpers.INSTANCE,
        "version": "0.1.0",
        "baseTopic": helpers.BASE,
        "backend": "qrs",
        "qrs": {
            "url": data["qrs"]["url"],
            "build": "14.212.3",
            "dateFilter": "no run in the last day to measure against: dates are sent as UTC",
        },
        "monitor": True,
        "monitoring": True,
    }
    health = await mqtt.request(f"{helpers.BASE}/request/health", {"requestId": "h-1"})
    latency = health.pop("qrs")
    assert health == {"status": "ok", "healthy": True, "broker": True,
                      "instance": helpers.INSTANCE, "requestId": "h-1"}  # fmt: skip
    assert latency["reachable"] is True and latency["latencyMs"] >= 0
    # Without a response topic the answer goes to <base>/reply/request/health.
    await mqtt.subscribe(f"{helpers.BASE}/reply/request/health")
    await mqtt.publish(f"{helpers.BASE}/request/health")
    [default] = await mqtt.wait_for(f"{helpers.BASE}/reply/request/health")
    assert default.json()["requestId"] is None
    bad = await mqtt.request(f"{helpers.BASE}/request/health", b"{nope")
    assert bad["error"]["code"] == "bad_payload"


async def test_without_the_monitor_nothing_is_watched(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    await mqtt.subscribe(f"{helpers.BASE}/info/+")
    await watch(mqtt)
    await make_daemon()
    [info] = await mqtt.wait_for(f"{helpers.BASE}/info/{helpers.INSTANCE}")
    assert (info.json()["monitor"], info.json()["monitoring"]) == (False, False)
    await fire_and_end(sim_state, OK)
    # Nothing asked QRS what changed (a monitor asks at once when it starts watching), and
    # nothing was published for the run.
    await mqtt.request(f"{helpers.BASE}/request/health")
    assert not [e for e in sim_state.journal if "modifiedDate" in e.query.get("filter", "")]
    assert not [
        r
        for r in mqtt.received
        if r.topic.startswith((f"{helpers.BASE}/status", f"{helpers.BASE}/state"))
    ]


# -- one bad run never stops the rest (DESIGN.md section 3) -------------------------------------


async def broken_read(*_: Any) -> str:
    raise RuntimeError("an answer this client has never seen")


@pytest.mark.parametrize("failure", ["unseen-exception", "http-500", "never-written"])
async def test_a_log_that_cannot_be_read_stops_nothing(
    make_daemon: Any,
    mqtt: Client,
    sim_state: SimState,
    failure: str,
    monkeypatch: pytest.MonkeyPatch,
    logged_exceptions: LoggedExceptions,
) -> None:
    """The failed run still gets its failure event (with its details), later runs are
    published, and a `wait` for another task gets its finished reply."""
    if failure == "unseen-exception":
        monkeypatch.setattr(QrsClient, "script_log_tail", broken_read)
        logged_exceptions.expect()
    elif failure == "http-500":
        sim_state.faults.fail_next, sim_state.faults.fail_status = 1000, 500
        sim_state.faults.path_contains = "scriptlog"
        monkeypatch.setattr(backend, "LOG_RETRY_S", (0.01, 0.01))
    else:
        sim_state.variants = Variants(log_ready_after_reads=10**6)
        monkeypatch.setattr(backend, "LOG_RETRY_S", (0.01, 0.01))
    await watch(mqtt)
    await monitoring(make_daemon, mqtt)
    failed = await fire_and_end(sim_state, FAIL)
    later = await fire_and_end(sim_state, OK)
    reply_topic = "test/reply/wait"
    await mqtt.subscribe(reply_topic)
    await mqtt.publish(
        f"{helpers.BASE}/start/id/{OUTSIDE}",
        {"requestId": "w-1", "wait": True},
        response_topic=reply_topic,
    )
    [_, finished] = await mqtt.wait_for(reply_topic, count=2)
    assert (finished.json()["stage"], finished.json()["status"]) == ("finished", "ok")
    [event] = await mqtt.wait_for(f"{helpers.BASE}/event/task/failed")
    assert event.json()["executionId"] == failed
    assert event.json()["reason"] == ERROR  # the run's error details, for want of its log
    await mqtt.wait_for(
        f"{helpers.BASE}/state/task/{OK}", until=lambda r: r.json()["executionId"] == later
    )
    await mqtt.wait_for(
        f"{helpers.BASE}/state/task/{FAIL}", until=lambda r: r.json()["executionId"] == failed
    )
    assert states_of(mqtt, later)[-1] == "FinishedSuccess"
    if failure == "unseen-exception":
        assert logged_exceptions.records == [
            f"mqtt_starter.service.run_events: monitor: reading the script log of execution"
            f" {failed} of task {FAIL} failed"
        ]


async def test_the_monitor_goes_on_while_a_log_is_awaited(
    make_daemon: Any, mqtt: Client, sim_state: SimState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed run whose log is not written yet waits in the background: the runs after it
    and a `wait` are served meanwhile (asserted by events: its failure event has not come)."""
    sim_state.variants = Variants(log_ready_after_reads=10**6)
    monkeypatch.setattr(backend, "LOG_RETRY_S", (3600.0,))
    await watch(mqtt)
    await monitoring(make_daemon, mqtt)
    failed = await fire_and_end(sim_state, FAIL)
    await mqtt.wait_for(
        f"{helpers.BASE}/status/task/{FAIL}", until=lambda r: r.json()["state"] == "FinishedFail"
    )
    later = await fire_and_end(sim_state, OK)
    await mqtt.wait_for(
        f"{helpers.BASE}/state/task/{OK}", until=lambda r: r.json()["executionId"] == later
    )
    answer = await mqtt.request(
        f"{helpers.BASE}/start/id/{OUTSIDE}", {"wait": True, "requestId": "w-2"}
    )
    assert answer["stage"] == "accepted"
    await mqtt.wait_for("test/reply/+", until=lambda r: r.json().get("stage") == "finished")
    assert mqtt.on(f"{helpers.BASE}/event/task/+") == []  # still waiting for the log of `failed`
    # Its final state waits too (an earlier state of the run may have been seen and kept).
    assert not [
        r
        for r in mqtt.on(f"{helpers.BASE}/state/task/{FAIL}")
        if (r.json()["executionId"], r.json()["state"]) == (failed, "FinishedFail")
    ]


@pytest.mark.parametrize("offset_h", [-5, 9])
async def test_runs_are_published_when_qrs_reads_dates_as_local_time(
    make_daemon: Any, mqtt: Client, sim_state: SimState, offset_h: int
) -> None:
    """West of UTC an uncorrected query returns nothing; east of UTC, everything."""
    sim_state.variants = Variants(date_filter_offset_s=offset_h * 3600)
    await fire_and_end(sim_state, OK)  # a run to measure against
    await watch(mqtt)
    await monitoring(make_daemon, mqtt)
    info = await mqtt.wait_for(
        f"{helpers.BASE}/info/{helpers.INSTANCE}",
        until=lambda r: "local time" in r.json()["qrs"]["dateFilter"],
    )
    assert info[-1].json()["qrs"]["dateFilter"] == (
        f"QRS reads filter dates as its local time (UTC{offset_h:+d} h): corrected for"
    )
    failed = await fire_and_end(sim_state, FAIL)
    [event] = await mqtt.wait_for(f"{helpers.BASE}/event/task/failed")
    assert event.json()["executionId"] == failed


async def test_a_wait_for_a_task_deleted_while_it_runs_ends_unknown(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    """The monitor's query never mentions the run again once its task is gone: the follower
    asks on its own after a few quiet intervals, and the finished reply says Unknown."""
    await monitoring(make_daemon, mqtt)
    reply_topic = "test/reply/deleted"
    await mqtt.subscribe(reply_topic)
    await mqtt.publish(
        f"{helpers.BASE}/start/id/{SLOW}",
        {"requestId": "d-1", "wait": True},
        response_topic=reply_topic,
    )
    [accepted] = await mqtt.wait_for(reply_topic)
    assert accepted.json()["tasks"][0]["result"] == "started"
    sim_state.delete(sim_state.tasks[SLOW])
    [_, finished] = await mqtt.wait_for(reply_topic, count=2)
    [task] = finished.json()["tasks"]
    assert (finished.json()["stage"], finished.json()["status"]) == ("finished", "error")
    assert task["state"] == "Unknown" and not task.get("timedOut")


async def test_per_task_series_on_metrics_and_a_deleted_tasks_go_away(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    port = free_port()
    await watch(mqtt)
    await mqtt.subscribe(f"{helpers.BASE}/info/+")
    await make_daemon(
        monitor={**MONITOR, "deleted_check_s": 0.2}, http={"enabled": True, "port": port}
    )
    await mqtt.wait_for(
        f"{helpers.BASE}/info/{helpers.INSTANCE}", until=lambda r: r.json()["monitoring"]
    )
    runs = {task_id: await fire_and_end(sim_state, task_id) for task_id in (OK, FAIL, GONE)}
    for task_id, execution_id in runs.items():
        await mqtt.wait_for(
            f"{helpers.BASE}/state/task/{task_id}",
            until=lambda r, e=execution_id: (
                r.json()["executionId"] == e  # type: ignore[misc]
                and r.json()["stateCode"] in (7, 8)
            ),
        )
    samples = await metric_samples(port)
    ok, fail = final(sim_state, runs[OK]), final(sim_state, runs[FAIL])
    assert samples[("mqtt_starter_task_last_state", OK)] == 7.0
    assert samples[("mqtt_starter_task_last_state", FAIL)] == 8.0
    assert samples[("mqtt_starter_task_runs_total", OK, "success")] == 1.0
    assert samples[("mqtt_starter_task_runs_total", FAIL, "failure")] == 1.0
    assert samples[("mqtt_starter_task_last_run_duration_seconds", OK)] == ok["duration"] / 1000
    assert samples[("mqtt_starter_task_last_run_duration_seconds", FAIL)] == fail["duration"] / 1000
    stopped = datetime.fromisoformat(ok["stopTime"].replace("Z", "+00:00")).timestamp()
    assert samples[("mqtt_starter_task_last_success_timestamp_seconds", OK)] == stopped
    assert ("mqtt_starter_task_last_success_timestamp_seconds", FAIL) not in samples
    # A task that is deleted: its state is cleared, and its series go away.
    sim_state.delete(sim_state.tasks[GONE])
    await mqtt.wait_for(f"{helpers.BASE}/state/task/{GONE}", until=lambda r: r.payload == b"")

    async def gone() -> bool:
        return not any(GONE in key for key in await metric_samples(port))

    await wait_until(gone, what="the deleted task's series to go")
    assert ("mqtt_starter_task_last_state", OK) in await metric_samples(port)


async def metric_samples(port: int, label: str = "task_id") -> dict[tuple[str, ...], float]:
    """The per-task (or per-`label`) samples of /metrics, parsed with prometheus_client's
    own parser."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        text = await response.text()
    found: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if label in sample.labels and not sample.name.endswith("_created"):
                outcome = (sample.labels["outcome"],) if "outcome" in sample.labels else ()
                found[(sample.name, sample.labels[label], *outcome)] = sample.value
    return found


# -- chains (DESIGN.md section 11) ---------------------------------------------------------------


async def test_a_chain_fires_once_for_each_upstream_end_whoever_started_it(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    chain = {
        "name": "adhoc-after-sales",
        "after": {"names": ["nightly sales"]},
        "on": "success",
        "start": {"names": ["Ad hoc"]},
    }
    await mqtt.subscribe(f"{helpers.BASE}/reply/chain/#")
    await monitoring(make_daemon, mqtt, chains=[chain])
    scheduled = await fire_and_end(sim_state, OK)  # a schedule's run: nobody asked through MQTT
    [first] = await mqtt.wait_for(f"{helpers.BASE}/reply/chain/adhoc-after-sales")
    assert first.json()["requestId"] == f"chain:adhoc-after-sales:{scheduled}"
    assert [(t["taskId"], t["result"]) for t in first.json()["tasks"]] == [(OUTSIDE, "started")]
    # A run a request started fires it too, once.
    answer = await mqtt.request(f"{helpers.BASE}/start/id/{OK}", {"requestId": "r-1"})
    requested = answer["tasks"][0]["executionId"]
    replies = await mqtt.wait_for(f"{helpers.BASE}/reply/chain/adhoc-after-sales", 2)
    assert [r.json()["requestId"] for r in replies] == [
        f"chain:adhoc-after-sales:{scheduled}",
        f"chain:adhoc-after-sales:{requested}",
    ]
    assert sim_state.started == [OUTSIDE, OK, OUTSIDE]


async def test_a_loop_of_two_chains_stops_at_run_time(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    def chain(name: str, after: str, start: str) -> dict[str, Any]:
        return {"name": name, "after": {"task_ids": [after]}, "on": "finished",
                "start": {"task_ids": [start]}}  # fmt: skip

    chains = [chain("x", OK, OUTSIDE), chain("y", OUTSIDE, OK)]
    await mqtt.subscribe(f"{helpers.BASE}/reply/chain/#")
    await monitoring(make_daemon, mqtt, chains=chains)
    await fire_and_end(sim_state, OK)
    [x] = await mqtt.wait_for(f"{helpers.BASE}/reply/chain/x")
    assert [t["result"] for t in x.json()["tasks"]] == ["started"]
    [y] = await mqtt.wait_for(f"{helpers.BASE}/reply/chain/y")
    assert (y.json()["status"], y.json()["tasks"], y.json()["unmatched"]) == (
        "error",
        [],
        [{"selector": f"id:{OK}", "reason": "chain_loop"}],
    )
    assert sim_state.started == [OUTSIDE]
