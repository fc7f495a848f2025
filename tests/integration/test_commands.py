"""The operator commands as a shell runs them: check and tasks."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from mqtt_starter.simulators.qrs.server import QrsSimulator
from tests.conftest import free_port, wait_until
from tests.integration import helpers
from tests.integration.conftest import Broker, Daemon, cli, daemon_config, tls_settings
from tests.integration.helpers import ARCHIVE, EXPORT, SALES, STOCK


async def cli_process(*args: str) -> tuple[int, str, str]:
    """The command as a shell runs it: `python -m mqtt_starter`."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mqtt_starter",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("MQTT_STARTER_")},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def write(tmp_path: Path, config: dict[str, Any]) -> str:
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


async def test_check_all_green_beside_a_running_daemon(
    tmp_path: Path, broker: Broker, simulator: QrsSimulator, daemon: Daemon
) -> None:
    path = write(tmp_path, daemon_config(broker, simulator))
    code, out, _ = await cli("check", "-c", path)
    lines = out.splitlines()
    assert code == 0, out
    assert lines[:3] == [
        f"mqtt-starter check: {path}",
        f"  ok    configuration {path}: valid",
        "  ok    files: every file the configuration names is readable",
    ]
    assert lines[3].startswith(
        f"  ok    broker 127.0.0.1:{broker.port} (MQTT 5, TLS off):"
        f" connected as {helpers.INSTANCE}-check-"
    )
    assert lines[4:] == [
        f"  ok    QRS {simulator.url} (certificate): answered, build 14.212.3",
        "  ok    QRS task query: 13 tasks visible",
        "  ok    QRS date filter: no run in the last day to measure against: dates are sent as UTC",
        "everything works",
    ]
    # Same configuration, other client id: the daemon kept its connection and session.
    check_id = lines[3].rsplit(" ", 1)[1]
    assert f" as {check_id} " in broker.log
    assert daemon.log.count("connected to broker") == 1
    assert "reconnecting" not in daemon.log


async def test_check_names_each_failure(tmp_path: Path, simulator: QrsSimulator) -> None:
    closed = free_port()
    config = daemon_config(Broker(tmp_path / "none"), simulator)
    config["mqtt"]["port"] = closed
    config["qrs"]["url"] = f"https://127.0.0.1:{free_port()}"
    code, out, _ = await cli("check", "-c", write(tmp_path, config))
    assert code == 1
    fails = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert len(fails) == 2
    assert "connection refused: is the broker listening there?" in fails[0]
    assert "failed after 1 attempt(s): ClientConnectorError" in fails[1]
    assert "  skip  QRS task query: QRS did not answer" in out


async def test_check_wrong_broker_password(
    tmp_path: Path, tls_broker: Any, simulator: QrsSimulator
) -> None:
    broker, tls_port, folder = tls_broker
    config = daemon_config(broker, simulator, mqtt=tls_settings(tls_port, folder, "bad-pw"))
    code, out, _ = await cli("check", "-c", write(tmp_path, config))
    assert code == 1
    assert (
        f"  FAIL  broker localhost:{tls_port} (MQTT 5, TLS on): the broker refused the login"
        " (wrong user name or password?): Not authorized (code 135)"
    ) in out.splitlines()
    assert "bad-pw" not in out


async def test_check_broker_tls_verify_failed(
    tmp_path: Path, tls_broker: Any, simulator: QrsSimulator
) -> None:
    broker, tls_port, folder = tls_broker
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    mqtt = tls_settings(tls_port, folder, "pw-789")
    mqtt["tls"]["ca_file"] = str(other)
    code, out, _ = await cli(
        "check", "-c", write(tmp_path, daemon_config(broker, simulator, mqtt=mqtt))
    )
    assert code == 1
    assert "TLS verification of the broker failed" in out


@pytest.mark.parametrize("fault", ["qrs_ca", "qrs_cert_garbage", "qrs_token"])
async def test_check_qrs_failures(
    tmp_path: Path, broker: Broker, simulator: QrsSimulator, fault: str
) -> None:
    config = daemon_config(broker, simulator)
    expected = ""
    if fault == "qrs_ca":
        other = tmp_path / "root.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        config["qrs"]["ca_file"] = str(other)
        expected = f"TLS verification of {simulator.url} failed"
    elif fault == "qrs_cert_garbage":
        garbage = tmp_path / "client.pem"
        garbage.write_text("not a certificate")
        config["qrs"]["cert_file"] = str(garbage)
        expected = f"qrs.cert_file: {garbage} (with {simulator.certs.client_key}) cannot be used"
    else:
        proxy = QrsSimulator(simulator.fixture, simulator.certs, prefix="/jwt", token="right")
        await proxy.start()
        config["qrs"].update(url=proxy.url, auth="jwt", jwt="wrong-token")
        expected = "QRS GET /qrs/about was redirected to /jwt/internal_forms_authentication/"
    try:
        code, out, _ = await cli("check", "-c", write(tmp_path, config))
    finally:
        if fault == "qrs_token":
            await proxy.stop()
    assert code == (78 if fault == "qrs_cert_garbage" else 1)  # a file is configuration
    [fail] = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert expected in fail
    assert "wrong-token" not in out


async def test_check_invalid_configuration(tmp_path: Path) -> None:
    """As a shell runs it, in a process: the exit code is the process's."""
    path = write(tmp_path, {"mqtt": {"port": "x"}})
    code, out, _ = await cli_process("check", "-c", path)
    assert code == 78
    assert out.splitlines()[1:3] == [
        f"  FAIL  configuration {path}: mqtt.port: input should be a valid integer, unable to"
        " parse string as an integer",
        f"  FAIL  configuration {path}: qrs: field required: `qrs` (client-managed Sense) or"
        " `cloud` (Qlik Cloud)",
    ]


async def test_tasks_table(tmp_path: Path, broker: Broker, simulator: QrsSimulator) -> None:
    config = daemon_config(broker, simulator, policy={"allow": {"tags": ["startTask1"]}})
    code, out, err = await cli(
        "tasks",
        "-c",
        write(tmp_path, config),
        "--tag",
        "Nightly",
        "--id",
        EXPORT,
        "--cp",
        "taskGroup=tasks9",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert [re.split(r"\s{2,}", line) for line in lines[:5]] == [
        ["ID", "NAME", "TYPE", "ENABLED", "TAGS", "LAST STATE", "ALLOWED", "MATCHED BY"],
        [
            EXPORT,
            "Export to Data Lake",
            "external",
            "yes",
            "startTask1",
            "NeverStarted",
            "yes",
            "id",
        ],
        [
            SALES,
            "Reload Sales",
            "reload",
            "yes",
            "Nightly,startTask1",
            "NeverStarted",
            "yes",
            "tag:Nightly",
        ],
        [STOCK, "Reload Stock", "reload", "yes", "Nightly", "NeverStarted", "no", "tag:Nightly"],
        [ARCHIVE, "Reload Archive", "reload", "no", "Nightly", "NeverStarted", "no", "tag:Nightly"],
    ]
    assert lines[5:] == ["unmatched: cp:taskGroup=tasks9 (no_tasks)", "4 task(s)"]
    assert simulator.state is not None and simulator.state.started == []


async def test_tasks_json(tmp_path: Path, broker: Broker, simulator: QrsSimulator) -> None:
    config = daemon_config(broker, simulator, policy={"allow": {"tags": ["startTask1"]}})
    code, out, _ = await cli(
        "tasks", "-c", write(tmp_path, config), "--tag", "startTask1", "--json"
    )
    assert code == 0
    assert json.loads(out) == {
        "tasks": [
            {
                "taskId": SALES,
                "taskName": "Reload Sales",
                "type": "reload",
                "enabled": True,
                "tags": ["Nightly", "startTask1"],
                "customProperties": [{"name": "taskGroup", "value": "tasks1"}],
                "space": None,  # Qlik Cloud only
                "lastState": "NeverStarted",
                "allowed": True,
                "matchedBy": ["tag:startTask1"],
            },
            {
                "taskId": EXPORT,
                "taskName": "Export to Data Lake",
                "type": "external",
                "enabled": True,
                "tags": ["startTask1"],
                "customProperties": [],
                "space": None,
                "lastState": "NeverStarted",
                "allowed": True,
                "matchedBy": ["tag:startTask1"],
            },
        ],
        "unmatched": [],
    }


async def test_tasks_lists_everything_without_selectors(
    tmp_path: Path, broker: Broker, simulator: QrsSimulator
) -> None:
    code, out, _ = await cli(
        "tasks", "-c", write(tmp_path, daemon_config(broker, simulator)), "--json"
    )
    assert code == 0
    tasks = json.loads(out)["tasks"]
    assert len(tasks) == 13
    assert sorted({t["type"] for t in tasks}) == ["external", "preload", "reload", "usersync"]


async def test_tasks_bad_custom_property(
    tmp_path: Path, broker: Broker, simulator: QrsSimulator
) -> None:
    code, _, err = await cli(
        "tasks", "-c", write(tmp_path, daemon_config(broker, simulator)), "--cp", "novalue"
    )
    assert (code, err.strip()) == (2, "mqtt-starter: --cp 'novalue': expected NAME=VALUE")


async def test_check_and_tasks_against_qlik_cloud(tmp_path: Path, broker: Broker) -> None:
    from mqtt_starter.simulators.certs import ensure_certificates
    from mqtt_starter.simulators.cloud.fixtures import load_cloud_fixture
    from mqtt_starter.simulators.cloud.server import CloudSimulator
    from tests.integration.conftest import site_config

    certs = ensure_certificates(tmp_path / "certs")
    sim = CloudSimulator(load_cloud_fixture(), certs)
    await sim.start()
    try:
        section = {"tenant_url": sim.url, "api_key": "sim-api-key", "ca_file": str(certs.root)}
        path = write(tmp_path, site_config(broker, "cloud", section))
        code, out, _ = await cli("check", "-c", path)
        assert code == 0, out
        assert out.splitlines()[4:] == [
            f"  ok    Qlik Cloud {sim.url} (api_key): answered, build Qlik Cloud",
            "  ok    Qlik Cloud app query: 6 apps visible",
            "everything works",
        ]
        code, out, _ = await cli("tasks", "-c", path, "--space", "Sales", "--cp", "a=b", "--json")
        assert code == 0, out
        listed = json.loads(out)
        assert [(t["taskName"], t["space"], t["matchedBy"]) for t in listed["tasks"]] == [
            ("Sales Dashboard", "Sales", ["space:Sales"]),
            ("Stock Levels", "Sales", ["space:Sales"]),
        ]
        assert listed["unmatched"] == [{"selector": "cp:a=b", "reason": "unsupported"}]
        assert sim.state is not None and sim.state.started == []
        section["api_key"] = "wrong"
        code, out, _ = await cli(
            "check", "-c", write(tmp_path, site_config(broker, "cloud", section))
        )
        assert code == 1
        assert "HTTP 401" in out and "cloud.api_key" in out and "wrong" not in out
    finally:
        await sim.stop()


async def test_a_corrupt_cloud_ca_file_is_a_configuration_error(
    tmp_path: Path, broker: Broker
) -> None:
    from tests.integration.conftest import site_config

    garbage = tmp_path / "ca.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    section = {"tenant_url": "https://127.0.0.1:9", "api_key": "k", "ca_file": str(garbage)}
    code, out, err = await cli(
        "check", "-c", write(tmp_path, site_config(broker, "cloud", section))
    )
    assert code == 78, out + err
    [fail] = [line for line in out.splitlines() if line.startswith("  FAIL")]
    assert fail.startswith(f"  FAIL  configuration cloud.ca_file: {garbage} cannot be used")
    assert "Traceback" not in out + err


async def test_check_says_how_qrs_reads_filter_dates(
    tmp_path: Path, broker: Broker, simulator: QrsSimulator
) -> None:
    from mqtt_starter.simulators.qrs.fixtures import Variants

    state = simulator.state
    assert state is not None
    state.variants = Variants(date_filter_offset_s=-5 * 3600)  # a server west of UTC
    execution_id = state.fire(state.tasks[SALES])
    await wait_until(lambda: execution_id not in state.sessions, what="the run's end")
    code, out, _ = await cli("check", "-c", write(tmp_path, daemon_config(broker, simulator)))
    assert code == 0, out
    assert (
        "  ok    QRS date filter: QRS reads filter dates as its local time (UTC-5 h): corrected for"
    ) in out.splitlines()
