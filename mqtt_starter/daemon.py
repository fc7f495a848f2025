"""The daemon: signals, one task group, and reload. Nothing else.

The parts (backend, trigger rules, allow-list) come from service/parts.py, the use case from
service/requests.py, the doors from doors/. Every task runs in the daemon's TaskGroup under a
name.
SIGTERM/SIGINT (on Windows also Ctrl+Break and a service stop; ops/platform.py): stop taking
messages, finish those in flight (bounded), `offline`, exit 0.
SIGHUP, or a change of the file with `watch_config`: reload the configuration. New parts are
built and swapped in; the old ones close once the requests and followers that hold them are
done, so a `wait` in progress still gets its finished reply. The broker connection is rebuilt
only when its settings or the subscriptions changed (same client id: the session and its
queued triggers survive).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from mqtt_starter import __version__
from mqtt_starter.config import Settings
from mqtt_starter.core.errors import ConfigError
from mqtt_starter.dispatch import Dispatch
from mqtt_starter.doors.mqtt import MqttDoor
from mqtt_starter.doors.mqtt_waits import WaitMemory
from mqtt_starter.instance import Instance, new_board
from mqtt_starter.mqtt.link import MqttLink
from mqtt_starter.ops.config_watch import ConfigWatch
from mqtt_starter.ops.logs import configure_logging
from mqtt_starter.ops.metrics import Metrics
from mqtt_starter.ops.platform import StopSignals, loop_name
from mqtt_starter.ops.systemd import Notifier
from mqtt_starter.ops.webhooks import Webhooks
from mqtt_starter.service.monitor import Monitor
from mqtt_starter.service.parts import Parts
from mqtt_starter.service.requests import Starter
from mqtt_starter.wiring import broker_tls, rebuild, serve_http, wire

if TYPE_CHECKING:
    from mqtt_starter.doors.http import HttpApi


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def warn_about_settings(settings: Settings) -> None:
    if settings.policy.allow is None:
        logger.warning(
            "policy.allow is not set: every task may be started by anyone who can"
            " publish to {}/start",
            settings.mqtt.base_topic,
        )
    if settings.qrs is not None and settings.qrs.insecure:
        logger.warning("qrs.insecure is true: the QRS server certificate is NOT verified")
    elif settings.qrs is not None and not settings.qrs.verify_hostname:
        logger.info(
            "qrs.verify_hostname is false: the QRS certificate chain is verified against"
            " qrs.ca_file, its host name is not"
        )
    if settings.mqtt.tls.enabled and settings.mqtt.tls.insecure:
        logger.warning("mqtt.tls.insecure is true: the broker host name is NOT checked")
    http = settings.http
    if http.enabled and not (http.tls.enabled or http.token) and http.host not in LOOPBACK:
        logger.warning(
            "the HTTP endpoint listens on {} without TLS or a token: what it is sent can be read"
            " and forged on the way",
            http.host,
        )
    if settings.http.enabled and settings.http.token is None:
        logger.warning(
            "http.token is not set: anyone who reaches {}:{} can start tasks and read the"
            " status page",
            settings.http.host,
            settings.http.port,
        )


class Daemon:
    """The process: signals, one task group, reload; the parts it runs are built here."""

    def __init__(
        self,
        settings: Settings,
        *,
        reload: Callable[[], Settings] | None = None,
        notifier: Notifier | None = None,
        config_path: Path | None = None,
        watch_interval_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self._reload_settings = reload
        self._watch = (
            None
            if config_path is None or reload is None
            else ConfigWatch(
                config_path,
                self.request_reload,
                enabled=lambda: self.settings.watch_config,
                interval_s=watch_interval_s,
            )
        )
        self.notifier = notifier or Notifier()
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._parts: Parts | None = None
        self._tls: ssl.SSLContext | None = None
        self.link: MqttLink | None = None
        self._link_task: asyncio.Task[None] | None = None
        self.http: HttpApi | None = None
        self.monitor: Monitor | None = None
        self.memory: WaitMemory | None = None
        self.dispatch: Dispatch | None = None
        self._webhooks: Webhooks | None = None
        self.board = new_board(settings)
        self.instance = Instance(
            lambda: self.settings,
            lambda: self.parts,
            lambda: self.link,
            self.board,
            self.notifier,
            self._spawn,
        )

    @property
    def ready(self) -> asyncio.Event:
        """Set once subscribed and the site answered (READY=1)."""
        return self.instance.ready

    @property
    def _dispatch(self) -> Dispatch:
        assert self.dispatch is not None, "Daemon.run() builds the dispatch first"
        return self.dispatch

    @property
    def parts(self) -> Parts:
        assert self._parts is not None, "Daemon.run() builds the parts first"
        return self._parts

    # -- lifecycle ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def _spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        assert self._group is not None
        task = self._group.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self) -> int:
        """Serve until SIGTERM; ConfigError (exit 78) when the parts cannot be built."""
        loop = asyncio.get_running_loop()
        signals = StopSignals(loop, self.request_stop, self.request_reload)
        signals.install()
        logger.info("mqtt-starter {} starting on {}", __version__, loop_name(loop))
        warn_about_settings(self.settings)
        self._parts = await Parts.build(self.settings, self.metrics.observe_qrs)
        try:
            self._tls = await broker_tls(self.settings)
            wired = wire(
                self.settings,
                lambda: self.settings,
                lambda: self.parts,
                lambda: self.link,
                self.instance,
                self.metrics,
                self._spawn,
                self._on_role,
            )
            self.monitor, self.memory, self.dispatch = wired.monitor, wired.memory, wired.dispatch
            door, starter = wired.door, wired.starter
            self._webhooks = wired.webhooks
            self._attach_monitor(self.parts)
            async with asyncio.TaskGroup() as group:
                self._group = group
                self.instance.start_probe()
                self._start_link(door)
                await self._start_http(starter)
                if self.settings.http.enabled:
                    self._spawn(self.instance.watch_site(), "site-watch")
                self._spawn(self.notifier.watchdog(), "watchdog")
                if self._watch is not None:
                    self._spawn(self._watch.run(), "config-watch")
                self._spawn(self.instance.announce_ready(), "ready")
                try:
                    await self._serve(door, starter)
                finally:
                    await self._shut_down()
        finally:
            await self.parts.retire()
            signals.remove()
            logger.info("stopped")
        return 0

    async def _serve(self, door: MqttDoor, starter: Starter) -> None:
        while not self._stop.is_set():
            stop = asyncio.create_task(self._stop.wait(), name="wait-stop")
            reload = asyncio.create_task(self._reload.wait(), name="wait-reload")
            await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            reload.cancel()
            if self._reload.is_set() and not self._stop.is_set():
                self._reload.clear()
                await self._apply_reload(door, starter)

    async def _shut_down(self) -> None:
        self.notifier.stopping()
        logger.info("stopping: finishing requests in flight")
        await self._stop_link(offline=True)
        await self._stop_http()
        if self._webhooks is not None:
            await self._webhooks.close()
        # Followers end with the daemon; a `wait` is resumed by the next one (mqtt_waits.py).
        for task in list(self._tasks):
            task.cancel()

    def _start_link(self, door: MqttDoor) -> None:
        s = self.settings.mqtt
        self.link = MqttLink(
            s,
            [f.text for f in self.parts.rules.subscriptions],
            f"{s.base_topic}/availability/{s.client_id}",
            on_connect=self._dispatch.on_connect,
            on_disconnect=self._dispatch.on_disconnect,
            tls=self._tls,
            private_subscriptions=self._dispatch.private_topics(),
        )
        self._link_task = self._spawn(self.link.run(self._dispatch.on_message), "mqtt-link")

    def _attach_monitor(self, parts: Parts) -> None:
        """The monitor serves the followers of these parts when it watches, and says which runs
        they started when another instance watches."""
        assert self.monitor is not None
        parts.tracker.attach(self.monitor)
        parts.tracker.claims.announcer = self.monitor.announce

    def _on_role(self) -> None:
        self.board.set_instance(monitoring=self.monitor is not None and self.monitor.leading)
        if self._group is not None and self.link is not None and self.link.connected.is_set():
            self._spawn(self.instance.publish_info_quietly(), "announce-role")

    async def _stop_link(self, *, offline: bool) -> None:
        if self.link is None or self._link_task is None:
            return
        self.link.stop(offline=offline)
        await asyncio.gather(self._link_task, return_exceptions=True)

    async def _start_http(self, starter: Starter) -> None:
        self.http = await serve_http(
            self.settings, starter, lambda: self.parts, self.metrics, self.instance
        )

    async def _stop_http(self) -> None:
        if self.http is not None:
            await self.http.stop()
            self.http = None

    # -- reload ----------------------------------------------------------------------------------

    async def _apply_reload(self, door: MqttDoor, starter: Starter) -> None:
        if self._reload_settings is None:
            return
        self.notifier.reloading()
        try:
            new = self._reload_settings()
            old = self.parts
            parts, tls = await rebuild(old, self.settings, new, self._tls, self.metrics)
        except ConfigError as exc:
            for problem in exc.problems:
                logger.error("reload refused, keeping the running configuration: {}", problem)
            self.notifier.status("reload refused: invalid configuration")
            return
        old_settings, self.settings, self._parts, self._tls = self.settings, new, parts, tls
        configure_logging(new.log)
        warn_about_settings(new)
        if parts.backend is not old.backend:
            self.instance.start_probe()
        if self.monitor is not None and parts.tracker is not old.tracker:
            old.tracker.attach(None)
        if self.monitor is not None:
            self.monitor.elect()
            self._attach_monitor(parts)
        # Requests in flight and followers keep the old parts until they are done.
        await old.retire()
        if (
            new.mqtt != old_settings.mqtt
            or old.rules.subscriptions != parts.rules.subscriptions
            or new.monitor.enabled != old_settings.monitor.enabled
        ):
            await self._stop_link(offline=False)
            self._start_link(door)
        if new.http != old_settings.http:
            await self._stop_http()
            await self._start_http(starter)
        logger.info("configuration reloaded")
        self.notifier.ready("configuration reloaded")
