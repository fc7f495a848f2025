"""The settings → the parts of a running daemon, wired together: the publisher that holds what
the broker cannot take, the request service, the monitor, the wait memory, the MQTT door and
the dispatch of the link's messages. The daemon only starts and stops them.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger

from mqtt_starter.config import Settings
from mqtt_starter.dispatch import Dispatch
from mqtt_starter.doors.mqtt import Link, MqttDoor, ReplyPublisher
from mqtt_starter.doors.mqtt_waits import WaitMemory
from mqtt_starter.instance import Instance
from mqtt_starter.mqtt.link import build_tls_context
from mqtt_starter.ops.metrics import Metrics
from mqtt_starter.ops.webhooks import Webhooks
from mqtt_starter.service.chains import Chains
from mqtt_starter.service.monitor import Monitor
from mqtt_starter.service.parts import Parts, allow_list, build_rules
from mqtt_starter.service.requests import Starter

if TYPE_CHECKING:
    from mqtt_starter.doors.http import HttpApi

Spawn = Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]


@dataclass(frozen=True)
class Wired:
    """The parts of a running daemon that live as long as it does."""

    publisher: ReplyPublisher
    starter: Starter
    monitor: Monitor
    memory: WaitMemory
    door: MqttDoor
    dispatch: Dispatch
    webhooks: Webhooks


def wire(
    initial: Settings,
    settings: Callable[[], Settings],
    parts: Callable[[], Parts],
    link: Callable[[], Link | None],
    instance: Instance,
    metrics: Metrics,
    spawn: Spawn,
    on_role: Callable[[], None],
) -> Wired:
    """Build and connect the parts; `settings`, `parts` and `link` are the current ones (a
    reload replaces them)."""
    board = instance.board
    publisher = ReplyPublisher(
        link, on_publish=board.published, hold_max=initial.mqtt.hold_max_messages
    )
    starter = Starter(parts, publisher, metrics, spawn, watcher=board)
    monitor = Monitor(
        parts,
        publisher,
        on_role=on_role,
        on_state=board.published,
        on_task=lambda task: board.task_tags(task.id, task.tags),
        spawn=spawn,
        metrics=metrics,
    )
    instance.publisher, instance.monitor = publisher, monitor
    monitor.runs.on_end = Chains(parts, starter, publisher, spawn).run_ended
    webhooks = Webhooks(settings, metrics, on_change=lambda w: board.set_instance(webhooks=w))
    monitor.runs.on_alert = webhooks.run_ended
    memory = WaitMemory(parts, publisher, starter.followups, spawn)
    door = MqttDoor(parts, starter, publisher, health=instance.health, memory=memory)
    dispatch = Dispatch(
        settings, parts, door, publisher, instance, metrics, spawn, memory=memory, monitor=monitor
    )
    return Wired(publisher, starter, monitor, memory, door, dispatch, webhooks)


async def serve_http(
    settings: Settings,
    starter: Starter,
    parts: Callable[[], Parts],
    metrics: Metrics,
    instance: Instance,
) -> HttpApi | None:
    """The HTTP endpoint, serving; None when it is off."""
    if not settings.http.enabled:
        return None
    from mqtt_starter.doors.http import HttpApi  # aiohttp.web only when the endpoint is on

    http = HttpApi(settings.http, starter, parts, metrics, instance.not_ready, board=instance.board)
    await http.start_serving()
    logger.info("HTTP endpoint on http://{}:{}", settings.http.host, http.port)
    return http


async def rebuild(
    old: Parts, old_settings: Settings, new: Settings, tls: ssl.SSLContext | None, metrics: Metrics
) -> tuple[Parts, ssl.SSLContext | None]:
    """The parts and the broker's TLS for new settings: new parts when the site changed, else
    the old backend under new rules (ConfigError when a file cannot be used)."""
    if new.qrs != old.settings.qrs or new.cloud != old.settings.cloud:
        parts = await Parts.build(new, metrics.observe_qrs)
    else:
        parts = old.successor(new, build_rules(new), allow_list(new.policy))
    if new.mqtt.tls != old_settings.mqtt.tls:
        tls = await broker_tls(new)
    if new.http.enabled and new.http != old_settings.http:
        from mqtt_starter.doors.http import server_tls  # aiohttp only with the endpoint

        await asyncio.to_thread(server_tls, new.http)  # refused here, before anything changes
    return parts, tls


async def broker_tls(settings: Settings) -> ssl.SSLContext | None:
    """The broker's TLS context (ConfigError naming the key when a file cannot be used)."""
    return await asyncio.to_thread(build_tls_context, settings.mqtt)
