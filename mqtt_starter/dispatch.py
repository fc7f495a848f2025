"""Where each message from the broker goes, and what a (re)connect sets off: the door for
requests, the wait memory and the monitor for their own (private) topics; after a connect,
what was held is published, then the instance's info and the markers that say the retained
messages have arrived.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from loguru import logger

from mqtt_starter.config import Settings
from mqtt_starter.core.errors import MqttLinkError
from mqtt_starter.doors.mqtt import MqttDoor, ReplyPublisher
from mqtt_starter.doors.mqtt_waits import WaitMemory
from mqtt_starter.instance import Instance
from mqtt_starter.mqtt.link import Incoming
from mqtt_starter.ops.metrics import Metrics
from mqtt_starter.service.monitor import Monitor
from mqtt_starter.service.parts import Parts

Spawn = Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]


class Dispatch:
    """Routes the link's messages and connection events to their owners."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        parts: Callable[[], Parts],
        door: MqttDoor,
        publisher: ReplyPublisher,
        instance: Instance,
        metrics: Metrics,
        spawn: Spawn,
        *,
        memory: WaitMemory | None = None,
        monitor: Monitor | None = None,
    ) -> None:
        self._settings = settings
        self._parts = parts
        self._door = door
        self._publisher = publisher
        self.instance = instance
        self.metrics = metrics
        self._spawn = spawn
        self.memory = memory
        self.monitor = monitor
        self._connected_once = False

    @property
    def settings(self) -> Settings:
        return self._settings()

    @property
    def board(self) -> Any:
        return self.instance.board

    def private_topics(self) -> list[str]:
        """What this instance alone subscribes to (never as a shared subscription)."""
        monitor = self.monitor
        return [
            *(self.memory.topics() if self.memory is not None else ()),
            *(
                monitor.topics(self._parts())
                if monitor is not None and self.settings.monitor.enabled
                else ()
            ),
        ]

    async def on_message(self, incoming: Incoming) -> None:
        if incoming.topic.startswith(f"{self._parts().base}/start"):
            # Most messages are triggers, and no private topic starts so: straight to the door.
            await self._door.on_message(incoming)
            return
        if self.memory is not None and self.memory.wants(incoming.topic):
            self.memory.on_message(incoming)
            return
        monitor = self.monitor
        if monitor is not None and self.settings.monitor.enabled and monitor.wants(incoming.topic):
            await monitor.on_message(incoming)
            return
        await self._door.on_message(incoming)

    def on_connect(self) -> None:
        if self._connected_once:
            self.metrics.reconnects.inc()
        self._connected_once = True
        self.metrics.broker_connected.set(1)
        self.board.set_instance(brokerConnected=True)
        self._publisher.hold_max = self.settings.mqtt.hold_max_messages
        self._spawn(self._publisher.flush(), "publish-held")
        self._spawn(self.after_connect(), "announce-info")

    async def after_connect(self) -> None:
        await self.instance.qrs_ready.wait()  # the info names QRS's build
        try:
            await self.instance.publish_info()
            if self.memory is not None:
                await self.memory.on_connect()
            if self.monitor is not None and self.settings.monitor.enabled:
                await self.monitor.on_connect()
        except MqttLinkError as exc:
            logger.debug("info not published: {}", exc)

    def on_disconnect(self) -> None:
        self.metrics.broker_connected.set(0)
        self.board.set_instance(brokerConnected=False)
        if self.monitor is not None:
            self.monitor.on_disconnect()
