"""`mqtt-starter demo --once`: the whole product, end to end, as a newcomer runs it."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from mqtt_starter.commands.demo import _free_port


@pytest.mark.slow
def test_demo_once_plays_the_tour_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mqtt_starter", "demo", "--once", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("mqtt-starter demo: broker 127.0.0.1:")
    assert lines[0].endswith("with 13 sample tasks, daemon ready")
    assert re.fullmatch(r"status page: http://127\.0\.0\.1:\d+/ \(watch the tour there\)", lines[2])
    # Status events interleave by timing; replies and requests come in a fixed order.
    fixed = [
        # The receiver's port and the simulator's wall-clock durations vary: their form is fixed.
        re.sub(r"after \d+\.\d s", "after N s", re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line))
        for line in lines[3:]
        if not line.startswith(("      [", "        | ", "      state  "))
    ]
    assert fixed == [
        "",
        ">>> Start one task by id",
        "    publish butler/start/id/6ca1c5f2-2742-44d5-8adf-d6cba3701a4e",
        "    reply (accepted): status ok",
        "      started         Reload Sales   matched by id",
        "",
        ">>> Start every task tagged Nightly (Reload Sales is still running)",
        "    publish butler/start/tag/Nightly",
        "    reply (accepted): status partial",
        "      already_running Reload Sales   matched by tag:Nightly",
        "      started         Reload Stock   matched by tag:Nightly",
        "      started         Reload Finance   matched by tag:Nightly",
        "      disabled        Reload Archive (disabled)   matched by tag:Nightly",
        "",
        ">>> Start the tasks whose custom property taskGroup is tasks2",
        '    publish butler/start/cp/taskGroup/tasks2 {"requestId": "demo-cp"}',
        "    reply (accepted): status partial",
        "      already_running Reload Finance   matched by cp:taskGroup=tasks2",
        "      started         Reload HR   matched by cp:taskGroup=tasks2",
        "      started         Reload Customer 360 (long)   matched by cp:taskGroup=tasks2",
        "      started         Export to Data Lake   matched by cp:taskGroup=tasks2",
        "",
        ">>> A JSON request that waits for the end: one task fails, one succeeds on retry",
        '    publish butler/start {"requestId": "demo-wait", "tags": ["Monthly",'
        ' "Nightly-fragile"], "wait": true}',
        "    reply (accepted): status ok",
        "      started         Reload Budget (retries once)   matched by tag:Monthly",
        "      started         Reload Forecast (fails)   matched by tag:Nightly-fragile",
        "    reply (finished): status partial",
        "      started         Reload Budget (retries once) -> FinishedSuccess"
        "   matched by tag:Monthly",
        "      started         Reload Forecast (fails) -> FinishedFail"
        "   matched by tag:Nightly-fragile",
        "",
        ">>> A scheduled run fails: nobody asked for it over MQTT, the monitor saw it",
        "    (the simulator fires the schedule of Reload Web Shop now)",
        "    event butler/event/task/failed: Reload Web Shop (scheduled, fails) FinishedFail,"
        " started by other; its reason, the script log's last lines:",
        "",
        ">>> The failure reached people, and its chain started the next task",
        '    webhook ops (a receiver on http://127.0.0.1:PORT/hook) got {"text": ...}:',
        "        Qlik Sense task Reload Web Shop (scheduled, fails) failed (FinishedFail)"
        " after N s",
        "    chain cleanup-after-shop (after a failure of Reload Web Shop):",
        "    reply (accepted): status ok",
        "      started         Cleanup QVD Folder   matched by tag:Maintenance",
        "    reply (finished): status ok",
        "      started         Cleanup QVD Folder -> FinishedSuccess   matched by tag:Maintenance",
        "",
        ">>> A dashboard that connects now sees each task's last run at once (retained)",
        "",
        "demo finished: broker, simulator and daemon stopped",
    ]
    reason = [line[10:] for line in lines if line.startswith("        | ")]
    assert len(reason) == 6
    assert [r[20:] for r in reason[-3:]] == [
        "Error: Cannot open file 'lib://Shop/orders.qvd'",
        "Execution Failed",
        "Execution finished.",
    ]
    states = dict(line[13:].split(": ", 1) for line in lines if line.startswith("      state  "))
    # Which runs have ended by then is timing; which tasks have a state, and the failed
    # scheduled run's, are not.
    assert sorted(states) == [
        "Cleanup QVD Folder",
        "Export to Data Lake",
        "Reload Budget (retries once)",
        "Reload Customer 360 (long)",
        "Reload Finance",
        "Reload Forecast (fails)",
        "Reload HR",
        "Reload Sales",
        "Reload Stock",
        "Reload Web Shop (scheduled, fails)",
    ]
    assert states["Reload Web Shop (scheduled, fails)"] == "FinishedFail (started by other)"
    assert states["Reload Forecast (fails)"] == "FinishedFail (started by mqtt-starter)"
    status = [line for line in lines if line.startswith("      [")]
    # The run's duration is the simulator's wall clock: only its form is fixed.
    assert any(
        re.search(
            r"Reload Forecast \(fails\): FinishedFail in \d+\.\d s \(Field 'Amount' not found\)",
            line,
        )
        for line in status
    )


def test_the_demo_broker_takes_the_wanted_port_when_it_is_free() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = int(taken.getsockname()[1])
        assert _free_port(busy) != busy
    free = _free_port()
    assert _free_port(free) == free


@pytest.mark.slow
def test_demo_cloud_plays_the_tour_against_the_cloud_simulator() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mqtt_starter", "demo", "--once", "--cloud", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "Qlik Cloud simulator https://127.0.0.1:" in lines[0]
    assert lines[0].endswith("with 6 sample apps, daemon ready")
    fixed = [line for line in lines[3:] if not line.startswith("      [")]
    refused = (
        "        (HR Headcount: Qlik Cloud refused the reload: HTTP 403 RELOADS-003 Not allowed:"
        " you may not reload this app)"
    )
    assert fixed == [
        "",
        ">>> Reload one app by id",
        "    publish butler/start/id/3a1f6c2e-8b4d-4e7a-9c0f-1d2e3f4a5b6c",
        "    reply (accepted): status ok",
        "      started         Sales Dashboard   matched by id",
        "",
        ">>> Reload every app tagged Nightly, in any space (Sales Dashboard is reloading)",
        "    publish butler/start/tag/Nightly",
        "    reply (accepted): status partial",
        "      already_running Sales Dashboard   matched by tag:Nightly",
        "      started         Finance Overview   matched by tag:Nightly",
        "      started         Stock Levels   matched by tag:Nightly",
        "",
        ">>> Reload the apps of the space Sales",
        '    publish butler/start/space/Sales {"requestId": "demo-space"}',
        "    reply (accepted): status partial",
        "      already_running Sales Dashboard   matched by space:Sales",
        "      started         Stock Levels   matched by space:Sales",
        "",
        ">>> Custom properties have no Qlik Cloud equivalent",
        "    publish butler/start/cp/taskGroup/tasks1",
        "    reply (accepted): status error",
        "      unsupported     cp:taskGroup=tasks1",
        "",
        ">>> A partial reload with a variable that waits for the end: one fails, one is refused",
        '    publish butler/start {"requestId": "demo-wait", "tags": ["Nightly-fragile"],'
        ' "names": ["HR Headcount"], "partial": true, "variables": {"vSource": "mqtt"},'
        ' "wait": true}',
        "    reply (accepted): status partial",
        "      started         Forecast   matched by tag:Nightly-fragile",
        "      failed          HR Headcount   matched by name",
        refused,
        "    reply (finished): status error",
        "      started         Forecast -> FAILED   matched by tag:Nightly-fragile",
        "      failed          HR Headcount   matched by name",
        refused,
        "",
        "demo finished: broker, simulator and daemon stopped",
    ]
