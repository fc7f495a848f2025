"""`mqtt-starter check`: validate the configuration, reach the broker and QRS, say what fails.

The broker is reached under a client id of its own (`<client_id>-check-<pid>`, clean session,
no Last Will), so that a running daemon keeps its session and nobody sees it go `offline`.
QRS is asked once (no retries): /qrs/about, then one task query.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mqtt_starter.config import Settings, file_problems, load_settings
from mqtt_starter.core.errors import ConfigError, MqttLinkError, QrsError
from mqtt_starter.mqtt.link import MqttPeer
from mqtt_starter.service.parts import open_backend


@dataclass(frozen=True)
class Check:
    """One line of `check`'s checklist: passed, failed or skipped, and why."""

    ok: bool | None  # None: skipped, because an earlier check failed
    what: str
    detail: str

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[self.ok]
        return f"  {mark}  {self.what}: {self.detail}"


async def check_broker(settings: Settings) -> Check:
    s = settings.mqtt
    client_id = f"{s.client_id}-check-{os.getpid()}"
    what = f"broker {s.host}:{s.port} (MQTT {s.protocol}, TLS {'on' if s.tls.enabled else 'off'})"
    try:
        async with MqttPeer(s, client_id):
            pass
    except MqttLinkError as exc:
        return Check(False, what, str(exc))
    return Check(True, what, f"connected as {client_id}")


async def check_qrs(settings: Settings) -> list[Check]:
    """The site (QRS or Qlik Cloud): it answers, and what it shows."""
    site = settings.site
    quick = site.model_copy(
        update={
            "retry": site.retry.model_copy(update={"attempts": 1}),
            "timeout_s": min(site.timeout_s, 10.0),
        }
    )
    key = "qrs" if settings.qrs is not None else "cloud"
    name, things = ("QRS", "tasks") if key == "qrs" else ("Qlik Cloud", "apps")
    what = f"{name} {site.url} ({site.auth})"
    query = f"{name} {things[:-1]} query"
    skipped = Check(None, query, f"{name} did not answer")
    try:
        backend = await open_backend(settings.model_copy(update={key: quick}))
    except ConfigError as exc:
        # A file the site client cannot use: a configuration error (exit 78), named by key.
        return [Check(False, f"configuration {p.path}", p.message) for p in exc.problems] + [
            skipped
        ]
    try:
        about = await backend.about()
        first = Check(True, what, f"answered, build {about.get('buildVersion', '?')}")
        try:
            count = await backend.task_count()
        except QrsError as exc:
            return [first, Check(False, query, str(exc))]
        if count is None:
            return [first, Check(False, query, "unexpected answer to the count")]
        checks = [first, Check(True, query, f"{count} {things} visible")]
        if key == "qrs":
            try:
                await backend.calibrate_dates()
                checks.append(Check(True, "QRS date filter", backend.date_note))
            except QrsError as exc:
                checks.append(Check(False, "QRS date filter", str(exc)))
        return checks
    except QrsError as exc:
        return [Check(False, what, str(exc)), skipped]
    finally:
        await backend.close()


async def run_checks(path: Path | None) -> tuple[list[Check], int]:
    """The checklist and the exit code: 0 all fine, 78 invalid configuration (a file the
    site client cannot use included), 1 otherwise."""
    where = str(path) if path else "environment"
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        return [Check(False, f"configuration {where}", str(p)) for p in exc.problems], 78
    checks = [Check(True, f"configuration {where}", "valid")]
    problems = file_problems(settings)
    checks += [Check(False, p.path, p.message) for p in problems] or [
        Check(True, "files", "every file the configuration names is readable")
    ]
    checks.append(await check_broker(settings))
    checks += await check_qrs(settings)
    if any(c.ok is False and c.what.startswith("configuration ") for c in checks):
        return checks, 78
    failed = any(c.ok is False for c in checks)
    return checks, (1 if failed else 0)
