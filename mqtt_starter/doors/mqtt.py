"""The MQTT door: a received message → an Inbound for the request service → the reply back.

It owns only what is MQTT's: reading the topic and payload (triggers.interpret), the reply
topic and Correlation Data, and publishing replies. Everything else (debounce, dedupe, the
log line, metrics, starts and follow-ups) is the request service's.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from loguru import logger

from mqtt_starter.core.codec import encode_reply
from mqtt_starter.core.errors import MqttLinkError
from mqtt_starter.core.model import Reply
from mqtt_starter.core.triggers import Health, Ignore, Refuse, interpret
from mqtt_starter.doors.mqtt_waits import Publisher, WaitMemory
from mqtt_starter.mqtt.link import Incoming
from mqtt_starter.ops.logs import RateLimitedLine
from mqtt_starter.service.parts import Parts
from mqtt_starter.service.requests import Inbound, Starter, error_reply


class Link(Publisher, Protocol):
    """The broker link as the door uses it (mqtt/link.py; tests use a fake): a publisher that
    says whether it is connected."""

    connected: asyncio.Event


@dataclass(frozen=True)
class _Held:
    topic: str
    payload: bytes
    retain: bool
    correlation_data: bytes | None


class ReplyPublisher:
    """Publishes to whatever broker link is current (a reload may replace it).

    What cannot be published now (no connection, or the broker dropped it) is held, in order
    and bounded (the oldest dropped first, counted in the log), and published once the link
    is back (`flush`, at every connect): a finished reply or a status event outlives a broker
    outage or a move to another broker. While anything is held, new messages queue behind it,
    so the order of a task's events is kept.
    """

    def __init__(
        self,
        link: Callable[[], Link | None],
        on_publish: Callable[[str, bytes], None] | None = None,
        *,
        hold_max: int = 10_000,
    ) -> None:
        """`on_publish`: told each message once the broker has it (the status page)."""
        self._link = link
        self._on_publish = on_publish
        self.hold_max = hold_max
        self._held: deque[_Held] = deque()
        self.dropped = 0
        self._dropped_log = RateLimitedLine(60.0)
        self._flushing = asyncio.Lock()

    @property
    def held(self) -> int:
        return len(self._held)

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        correlation_data: bytes | None = None,
    ) -> None:
        link = self._link()
        if self._held or link is None or not link.connected.is_set():
            self._hold(
                _Held(topic, payload, retain, correlation_data), "not connected to the broker"
            )
            return
        try:
            await link.publish(topic, payload, retain=retain, correlation_data=correlation_data)
        except MqttLinkError as exc:
            self._hold(_Held(topic, payload, retain, correlation_data), str(exc))
            return
        if self._on_publish is not None:
            self._on_publish(topic, payload)

    def _hold(self, message: _Held, why: str) -> None:
        if not self._held:
            logger.info("holding what is published until the broker is back ({})", why)
        if len(self._held) >= self.hold_max:
            self._held.popleft()
            self.dropped += 1
            self._dropped_log.warning(
                "mqtt.hold_max_messages ({}) reached: the oldest held message was dropped"
                " ({} in all)",
                self.hold_max,
                self.dropped,
            )
        self._held.append(message)
        logger.debug("held for the broker: {}", message.topic)

    async def flush(self) -> None:
        """Publish what is held, in order, while the link stays up."""
        async with self._flushing:
            count = 0
            while self._held:
                link = self._link()
                if link is None or not link.connected.is_set():
                    return
                message = self._held[0]
                try:
                    await link.publish(
                        message.topic,
                        message.payload,
                        retain=message.retain,
                        correlation_data=message.correlation_data,
                    )
                except MqttLinkError as exc:
                    logger.info("the broker went away again; still holding: {}", exc)
                    return
                self._held.popleft()
                count += 1
                if self._on_publish is not None:
                    self._on_publish(message.topic, message.payload)
            if count:
                logger.info("published the {} message(s) held while the broker was away", count)


HealthCheck = Callable[[str | None], Awaitable[bytes]]


class MqttDoor:
    """Turns each received message into a request for the request service, and replies."""

    def __init__(
        self,
        parts: Callable[[], Parts],
        starter: Starter,
        publisher: ReplyPublisher,
        health: HealthCheck | None = None,
        memory: WaitMemory | None = None,
    ) -> None:
        """`health`: the answer to `<base>/request/health` for a requestId; `memory`: keeps
        each `wait` in flight on the broker, so that a restart resumes it."""
        self._parts = parts
        self._starter = starter
        self._publisher = publisher
        self._health = health
        self._memory = memory

    async def on_message(self, incoming: Incoming) -> None:
        started = time.monotonic()
        parts = self._parts()
        decision = interpret(
            parts.rules,
            incoming.topic,
            incoming.payload,
            retain=incoming.retain,
            response_topic=incoming.response_topic,
        )
        if isinstance(decision, Ignore):
            self._starter.count_ignored(decision.kind)
            logger.info("ignored {}: {}", incoming.topic, decision.reason)
            return
        if isinstance(decision, Refuse):
            reply = error_reply(decision.request_id, decision.error.code, str(decision.error))
            # Counted before the reply goes out, as a served request is: whoever reads the
            # metrics after the reply sees it.
            self._starter.account("mqtt", incoming.topic, decision.kind, reply, started)
            await self._reply(parts, decision.reply_topic, reply, incoming)
            return
        if isinstance(decision, Health):
            if self._health is not None and decision.reply_topic is not None:
                await self._publisher.publish(
                    decision.reply_topic,
                    await self._health(decision.request_id),
                    correlation_data=incoming.correlation_data,
                )
            return
        inbound = Inbound(
            decision.request,
            door="mqtt",
            topic=incoming.topic,
            kind=decision.kind,
            debounce_key=decision.debounce_key,
            debounce_s=decision.debounce_s,
        )
        if not decision.request.wait:
            reply = await self._starter.handle(inbound)
            await self._reply(parts, decision.reply_topic, reply, incoming)
            return
        await self._handle_wait(parts, inbound, decision.reply_topic, incoming)

    async def _handle_wait(
        self, parts: Parts, inbound: Inbound, reply_topic: str | None, incoming: Incoming
    ) -> None:
        """A request with `wait`: the accepted reply, then the finished one, kept in the
        memory in between so that a restart resumes it."""
        accepted_sent = asyncio.Event()
        kept: str | None = None  # the wait's record in the memory (wait_memory.py)

        async def on_finished(finished: Reply) -> None:
            await accepted_sent.wait()  # the finished reply never overtakes the accepted one
            await self._reply(self._parts(), reply_topic, finished, incoming)
            if kept is not None and self._memory is not None:
                await self._memory.forget(
                    kept, [o.execution_id for o in finished.outcomes if o.execution_id]
                )

        reply = await self._starter.handle(inbound, on_finished=on_finished)
        try:
            await self._reply(parts, reply_topic, reply, incoming)
            request = inbound.request
            if (
                self._memory is not None
                and reply_topic is not None
                and reply.error is None
                and not reply.replayed
            ):
                timeout_s = request.wait_timeout_s or parts.settings.status.wait_timeout_s
                kept = await self._memory.remember(
                    reply, reply_topic, incoming.correlation_data, timeout_s
                )
        finally:
            accepted_sent.set()

    async def _reply(
        self, parts: Parts, topic: str | None, reply: Reply, incoming: Incoming
    ) -> None:
        if topic is None:
            logger.warning(
                "no reply for {}: its default reply topic would trigger a route", incoming.topic
            )
            return
        await self._publisher.publish(
            topic, encode_reply(reply, parts.instance), correlation_data=incoming.correlation_data
        )
