"""What this instance says about itself: whether its site answers (the start-up probe,
readiness, the health check) and its retained `<base>/info/<instance>`.

The daemon owns the process; this owns the questions "am I ready?" and "who am I?", asked by
systemd (READY=1), `/readyz`, `<base>/request/health` and the other instances.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from loguru import logger

from mqtt_starter import __version__
from mqtt_starter.config import Settings
from mqtt_starter.core.codec import encode_json, health_json
from mqtt_starter.core.errors import MqttLinkError, QrsError
from mqtt_starter.core.monitoring import iso
from mqtt_starter.doors.mqtt import Link, ReplyPublisher
from mqtt_starter.doors.status_board import StatusBoard
from mqtt_starter.ops.systemd import Notifier
from mqtt_starter.service.monitor import Monitor
from mqtt_starter.service.parts import Parts

# Readiness asks the site again when its last answer is older than this.
QRS_FRESH_S = 30.0
# How often the status page's view of the site is refreshed (by a readiness check).
SITE_WATCH_S = 10.0

Spawn = Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]


def new_board(settings: Settings) -> StatusBoard:
    """The status page's board, with what the instance is."""
    return StatusBoard(
        settings.mqtt.base_topic,
        {
            "instance": settings.mqtt.client_id,
            "version": __version__,
            "startedAt": iso(datetime.now(UTC)),
            "backend": "cloud" if settings.cloud is not None else "qrs",
            "siteUrl": settings.site.url,
            "brokerConnected": False,
            "siteReachable": False,
            "monitor": settings.monitor.enabled,
            "monitoring": False,
        },
    )


class Instance:
    """The site probe, readiness, health and the retained info of this instance."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        parts: Callable[[], Parts],
        link: Callable[[], Link | None],
        board: StatusBoard,
        notifier: Notifier,
        spawn: Spawn,
    ) -> None:
        self._settings = settings
        self._parts = parts
        self._link = link
        self.board = board
        self.notifier = notifier
        self._spawn = spawn
        self.publisher: ReplyPublisher | None = None
        self.monitor: Monitor | None = None
        self.qrs_ready = asyncio.Event()
        self.ready = asyncio.Event()  # subscribed and the site answered (READY=1)
        self.started_at = iso(datetime.now(UTC))
        self._qrs_build = ""
        self._probe: asyncio.Task[None] | None = None

    @property
    def settings(self) -> Settings:
        return self._settings()

    @property
    def parts(self) -> Parts:
        return self._parts()

    @property
    def link(self) -> Link | None:
        return self._link()

    def start_probe(self) -> None:
        """Ask the site until it answers (again after a reload that changed it)."""
        if self._probe is not None:
            self._probe.cancel()
        self.qrs_ready.clear()
        self._probe = self._spawn(self._probe_qrs(self.parts), "qrs-probe")

    async def _probe_qrs(self, parts: Parts) -> None:
        while True:
            try:
                about = await parts.backend.about()
                self._qrs_build = str(about.get("buildVersion", ""))
                self.board.set_instance(siteReachable=True)
                logger.info(
                    "{} {} answered (build {})",
                    parts.backend.site.upper(),
                    parts.settings.site.url,
                    about.get("buildVersion", "?"),
                )
                self.qrs_ready.set()
                return
            except QrsError as exc:
                logger.warning("QRS not ready: {}", exc)
                self.notifier.status(f"waiting for QRS: {exc}")
                await asyncio.sleep(parts.settings.site.retry.max_backoff_s)

    async def publish_info_quietly(self) -> None:
        try:
            await self.publish_info()
        except MqttLinkError as exc:
            logger.debug("info not published: {}", exc)

    async def publish_info(self) -> None:
        """The retained `<base>/info/<instance>` (DESIGN.md section 7)."""
        s = self.settings
        assert self.publisher is not None
        info = {
            "instance": s.mqtt.client_id,
            "version": __version__,
            "startedAt": self.started_at,
            "baseTopic": s.mqtt.base_topic,
            "backend": self.parts.backend.site,
            self.parts.backend.site: {
                "url": s.site.url,
                "build": self._qrs_build or None,
                "dateFilter": self.parts.backend.date_note,
            },
            "monitor": s.monitor.enabled,
            "monitoring": self.monitor is not None and self.monitor.leading,
        }
        await self.publisher.publish(
            f"{s.mqtt.base_topic}/info/{s.mqtt.client_id}", encode_json(info), retain=True
        )

    async def health(self, request_id: str | None) -> bytes:
        """The answer to a health check: whether QRS answers, and how fast."""
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.parts.backend.about(), self.settings.site.timeout_s)
            reachable, latency = True, (time.monotonic() - started) * 1000
        except (QrsError, TimeoutError):
            reachable, latency = False, None
        return encode_json(
            health_json(
                self.settings.mqtt.client_id, request_id, reachable=reachable, latency_ms=latency
            )
        )

    async def not_ready(self) -> list[str]:
        """Why the daemon cannot serve now; empty when it can."""
        reasons = []
        if self.link is None or not self.link.connected.is_set():
            reasons.append(
                f"not connected to the broker {self.settings.mqtt.host}:{self.settings.mqtt.port}"
            )
        backend = self.parts.backend
        last = backend.last_success
        if last is None or time.monotonic() - last > QRS_FRESH_S:
            try:
                await asyncio.wait_for(backend.about(), self.settings.site.timeout_s)
            except (QrsError, TimeoutError) as exc:
                reasons.append(f"{backend.site.upper()} does not answer: {exc}")
        self.board.set_instance(siteReachable=not any("does not answer" in r for r in reasons))
        return reasons

    async def watch_site(self) -> None:
        """Keep the status page's view of the site current (at most one call per interval,
        and none while other calls succeed)."""
        while True:
            await asyncio.sleep(SITE_WATCH_S)
            await self.not_ready()

    async def announce_ready(self) -> None:
        """READY=1 once the site answered and the current link is connected."""
        await self.qrs_ready.wait()
        # A reload may replace the link while this waits: ready is the current one's connection.
        while True:
            link = self.link
            assert link is not None, "the link is started before readiness is awaited"
            await link.connected.wait()
            if link is self.link:
                break
        self.notifier.ready(
            f"serving {self.settings.mqtt.base_topic}/start on"
            f" {self.settings.mqtt.host}:{self.settings.mqtt.port}"
        )
        self.ready.set()
        logger.info("ready")
