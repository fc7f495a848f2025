"""The shipped examples against a real broker and the daemon: the ACL file and rr.sh."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from mqtt_starter.simulators.qrs.server import QrsSimulator
from mqtt_starter.simulators.qrs.state import SimState
from tests.integration.conftest import Broker, Client, Daemon, daemon_config
from tests.integration.helpers import SALES, STOCK

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture
def broker(private_broker: Broker) -> Broker:
    """The examples speak the default base topic `butler`: a broker of their own."""
    return private_broker


async def test_rr_script_runs_against_the_daemon(
    daemon: Daemon, broker: Broker, sim_state: SimState
) -> None:
    process = await asyncio.create_subprocess_exec(
        "bash",
        str(EXAMPLES / "rr.sh"),
        "127.0.0.1",
        str(broker.port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err
    replies = [json.loads(line) for line in out.decode().splitlines()]
    assert [(r["requestId"], r["status"], r["stage"]) for r in replies] == [
        ("shell-1", "partial", "accepted"),
        ("shell-2", "partial", "accepted"),
        ("shell-2", "partial", "finished"),
        (None, "error", "accepted"),
    ]
    assert replies[3]["unmatched"] == [{"selector": "tag:Sales/EMEA", "reason": "no_tasks"}]
    assert STOCK in sim_state.started


def write_passwords(path: Path, users: tuple[str, ...]) -> None:
    for i, user in enumerate(users):
        subprocess.run(
            ["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(path), user, f"{user}-pw"],
            check=True,
            capture_output=True,
        )


async def test_acl_example_stops_an_unauthorised_publisher(
    tmp_path: Path, simulator: QrsSimulator, sim_state: SimState
) -> None:
    folder = tmp_path / "acl-broker"
    folder.mkdir()
    passwd = folder / "passwd"
    await asyncio.to_thread(write_passwords, passwd, ("mqtt-starter", "erp", "nodered", "guest"))
    conf = (EXAMPLES / "mosquitto" / "mosquitto.conf").read_text()
    settings = [
        line
        for line in conf.splitlines()
        if line.startswith(("allow_anonymous", "set_tcp_nodelay"))
    ]
    assert settings == ["allow_anonymous false", "set_tcp_nodelay true"]
    broker = Broker(
        folder,
        extra=(f"password_file {passwd}\nacl_file {EXAMPLES / 'mosquitto' / 'mqtt-starter.acl'}\n"),
    )
    broker.start()
    daemon = Daemon(
        tmp_path / "acl-daemon",
        daemon_config(
            broker,
            simulator,
            mqtt={
                "client_id": "starter-test",
                "username": "mqtt-starter",
                "password": "mqtt-starter-pw",
                "reply_topic_allow": ["butler/reply/#", "erp/replies/#"],
            },
        ),
    )
    try:
        await daemon.start()
        guest = Client(broker, client_id="guest", username="guest", password="guest-pw")
        erp = Client(broker, client_id="erp", username="erp", password="erp-pw")
        # Sees every start the broker lets through (the daemon's user may read them all).
        auditor = Client(
            broker, client_id="auditor", username="mqtt-starter", password="mqtt-starter-pw"
        )
        async with guest, erp, auditor:
            await auditor.subscribe("butler/start/#")
            await erp.subscribe("erp/replies/1")
            # The guest may publish nothing; the ERP user only by tag.
            await guest.publish(f"butler/start/id/{SALES}", {"requestId": "guest"})
            await erp.publish(f"butler/start/id/{SALES}", {"requestId": "erp-by-id"})
            await erp.publish(
                "butler/start/tag/Nightly", {"requestId": "erp-by-tag", "replyTo": "erp/replies/1"}
            )
            [answer] = await erp.wait_for("erp/replies/1")
            # The broker delivers a client's messages in order, and the guest's went before
            # the ERP's: once the allowed one is seen, any that got through would be too.
            [allowed] = await auditor.wait_for("butler/start/#")
        assert allowed.json()["requestId"] == "erp-by-tag"
        assert answer.json()["requestId"] == "erp-by-tag"
        assert "guest" not in daemon.log
        assert "erp-by-id" not in daemon.log
        assert sorted(sim_state.started) == sorted([SALES, STOCK])
    finally:
        await daemon.stop()
        broker.stop()
