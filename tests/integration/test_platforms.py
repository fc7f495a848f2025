"""Running where there are no POSIX signals (Windows, some containers): stop through the plain
`signal` module, reload through `watch_config`; and the `health` command the container's health
check runs.

The daemon processes here run on tests/windows_like.py's event loop, which refuses signal
handlers as Windows' does.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from mqtt_starter import cli
from mqtt_starter.commands.health import Health, check_health
from mqtt_starter.config import settings_from_mapping
from mqtt_starter.simulators.qrs.state import SimState
from tests.conftest import free_port, wait_until
from tests.integration import helpers
from tests.integration.conftest import Broker, Client, Daemon, LocalDaemon
from tests.integration.helpers import only_nightly_started


async def windows_like(make_daemon: Any, **sections: Any) -> Daemon:
    daemon: Daemon = await make_daemon(start=False, **sections)
    daemon.module = "tests.windows_like"
    await daemon.start()
    return daemon


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "service-stop"])
async def test_a_stop_without_signal_handlers_says_offline_and_exits_0(
    make_daemon: Any, broker: Broker, sig: signal.Signals
) -> None:
    daemon = await windows_like(make_daemon)
    daemon.signal(sig)
    assert await daemon.wait() == 0
    assert "stop signals caught without the event loop" in daemon.log
    assert daemon.log.rstrip().endswith("stopped")
    async with Client(broker) as client:
        await client.subscribe(f"{helpers.BASE}/availability/{helpers.INSTANCE}")
        [offline] = await client.wait_for(f"{helpers.BASE}/availability/{helpers.INSTANCE}")
    assert (offline.payload, offline.retain) == (b"offline", True)


async def test_watch_config_applies_a_change_refuses_an_invalid_one_then_applies_the_next(
    make_daemon: Any, mqtt: Client, sim_state: SimState
) -> None:
    daemon = await windows_like(make_daemon, watch_config=True)
    assert daemon.notify is not None
    dry = {"dryRun": True}
    both = await mqtt.request(f"{helpers.BASE}/start/tag/startTask1", dry)
    assert [t["result"] for t in both["tasks"]] == ["dry_run", "dry_run"]

    allow_nightly = {**daemon.config, "policy": {"allow": {"tags": ["Nightly"]}}}
    seen = len(daemon.notify.messages)
    daemon.write_config(allow_nightly)
    await daemon.notify.wait_for("STATUS=configuration reloaded", after=seen)
    answer = await mqtt.request(f"{helpers.BASE}/start/tag/startTask1")
    assert answer == only_nightly_started(sim_state)

    seen = len(daemon.notify.messages)
    daemon.config_path.write_text(daemon.config_path.read_text() + "mqtt: {port: nope}\n")
    await daemon.notify.wait_for("STATUS=reload refused: invalid configuration", after=seen)
    assert "reload refused, keeping the running configuration: mqtt.port:" in daemon.log
    still = await mqtt.request(f"{helpers.BASE}/start/tag/startTask1", dry)
    assert [t["result"] for t in still["tasks"]] == ["dry_run", "denied"]

    seen = len(daemon.notify.messages)
    daemon.write_config({**daemon.config, "policy": {}})
    await daemon.notify.wait_for("STATUS=configuration reloaded", after=seen)
    again = await mqtt.request(f"{helpers.BASE}/start/tag/startTask1", dry)
    assert [t["result"] for t in again["tasks"]] == ["dry_run", "dry_run"]
    assert daemon.log.count("watch_config:") == 3
    assert "SIGHUP" not in daemon.log


# -- the health command ------------------------------------------------------------------------


def health_of(config: dict[str, Any]) -> Health:
    return check_health(settings_from_mapping(config, {}), timeout_s=10)


async def test_health_says_ready_with_the_token(
    make_local_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy in the environment is not asked: nothing listens there.
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")
    port = free_port()
    http = {"enabled": True, "port": port, "token": "t0ken-for-health"}
    daemon: LocalDaemon = await make_local_daemon(http=http)
    health = await asyncio.to_thread(health_of, daemon.config)
    assert health == Health(0, f"ready (http://127.0.0.1:{port}/readyz)")
    wrong = {**daemon.config, "http": {**http, "token": "not-the-token"}}
    refused = await asyncio.to_thread(health_of, wrong)
    assert refused == Health(
        1, f"not ready: http://127.0.0.1:{port}/readyz refused http.token (401)"
    )
    assert "t0ken-for-health" not in daemon.log


async def test_health_says_not_ready_with_the_reason(make_local_daemon: Any) -> None:
    port, nobody = free_port(), free_port()
    daemon: LocalDaemon = await make_local_daemon(
        start=False,
        http={"enabled": True, "port": port, "host": "0.0.0.0", "allow_no_token": True},
    )
    daemon.config["mqtt"] = {**daemon.config["mqtt"], "port": nobody}
    await daemon.start(wait_ready=False)
    await wait_until(lambda: "HTTP endpoint on" in daemon.log, what="the HTTP endpoint")
    health = await asyncio.to_thread(health_of, daemon.config)
    assert health == Health(
        1,
        f"not ready: not connected to the broker 127.0.0.1:{nobody}"
        f" (http://127.0.0.1:{port}/readyz)",
    )


def test_health_says_not_running_and_needs_the_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    config = tmp_path / "mqtt-starter.yaml"
    config.write_text(
        f"qrs: {{url: 'https://sense:4242'}}\nhttp: {{enabled: true, port: {port}}}\n"
    )
    assert cli.main(["health", "-c", str(config)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(
        f"mqtt-starter health: not running: nothing answers at http://127.0.0.1:{port}/readyz ("
    )
    config.write_text("qrs: {url: 'https://sense:4242'}\n")
    assert cli.main(["health", "-c", str(config)]) == 78
    assert capsys.readouterr().err == (
        "mqtt-starter health: http.enabled is false: the health check asks the HTTP endpoint's"
        " /readyz\n"
    )
    assert cli.main(["health", "-c", str(tmp_path / "none.yaml")]) == 78
    assert capsys.readouterr().err == (
        "mqtt-starter: invalid configuration:\n"
        f"  no configuration file at {tmp_path / 'none.yaml'} (-c or MQTT_STARTER_CONFIG names"
        " another)\n"
    )


@pytest.mark.parametrize(
    ("asked", "runs_on"),
    [(None, "uvloop"), ("asyncio", "asyncio (_UnixSelectorEventLoop)")],
)
async def test_the_daemon_runs_on_uvloop_unless_told_otherwise(
    make_daemon: Any, mqtt: Client, asked: str | None, runs_on: str
) -> None:
    daemon: Daemon = await make_daemon(start=False)
    env = {"MQTT_STARTER_LOOP": asked} if asked else {}
    if not asked:
        daemon.unset_env = ["MQTT_STARTER_LOOP"]
    await daemon.start(env=env)
    assert f"starting on {runs_on}" in daemon.log
    answer = await mqtt.request(f"{helpers.BASE}/start/tag/startTask1", {"dryRun": True})
    assert [t["result"] for t in answer["tasks"]] == ["dry_run", "dry_run"]
