"""The service definitions shipped for each platform agree with the daemon's own settings."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from mqtt_starter.config import MqttSettings

ROOT = Path(__file__).resolve().parents[2]


def seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"sec": 1, "min": 60}[unit]


def test_the_winsw_service_stops_after_the_drain_and_restarts_on_failure() -> None:
    service = ET.parse(ROOT / "windows/mqtt-starter.xml").getroot()
    assert service.findtext("id") == "mqtt-starter"
    assert service.findtext("executable", "").endswith(r"\venv\Scripts\mqtt-starter.exe")
    assert service.findtext("arguments") == (
        r'run -c "%ProgramData%\mqtt-starter\mqtt-starter.yaml"'
    )
    # The service manager must wait longer than the daemon's drain, or a stop cuts it short.
    drain = MqttSettings().stop_timeout_s
    assert seconds(service.findtext("stoptimeout", "")) > drain
    assert [f.get("action") for f in service.findall("onfailure")] == ["restart"] * 3
    [log_file] = [e for e in service.findall("env") if e.get("name") == "MQTT_STARTER_LOG__FILE"]
    assert log_file.get("value") == r"%ProgramData%\mqtt-starter\logs\mqtt-starter.log"


def test_the_systemd_unit_stops_after_the_drain() -> None:
    unit = (ROOT / "systemd/mqtt-starter.service").read_text()
    [line] = [text for text in unit.splitlines() if text.startswith("TimeoutStopSec=")]
    assert float(line.split("=")[1]) > MqttSettings().stop_timeout_s
