"""The broker connection: the only module that imports the MQTT library (aiomqtt over paho).

What it promises (mqtt-notes.md):
- a fixed client id and a persistent session (v5: clean_start=False and a Session Expiry
  Interval; 3.1.1: clean_session=False), so triggers published while the daemon is away wait;
- manual acknowledgement: a QoS 1 message is acked only when its handler returned, and only
  on the connection it arrived on (a mid means nothing on the next one: the broker redelivers);
- at most `max_in_flight` handlers at once (also sent as MQTT 5 Receive Maximum): the broker
  holds the rest, so nothing piles up here;
- TCP_NODELAY, `online` retained after every connect, `offline` as the Last Will and before a
  clean stop; reconnect with jittered exponential backoff, subscribing again each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiomqtt
import paho.mqtt.client as paho
from loguru import logger
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqtt_starter.config import MqttSettings
from mqtt_starter.core.errors import ConfigError, MqttLinkError


@dataclass(frozen=True)
class Incoming:
    """A received message, as the rest of the daemon sees it."""

    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None


Handler = Callable[[Incoming], Awaitable[None]]


class _CorrelationData:
    """A PUBLISH's properties when Correlation Data is the only one, packed at once.

    paho's Properties builds its name tables anew for every instance and looks each name up
    by scanning them: for a reply, that cost more than the rest of the publication. paho only
    calls `pack()` on what it is given."""

    __slots__ = ("_packed",)

    def __init__(self, data: bytes) -> None:
        # Property 9 (Correlation Data): two-byte length, then the bytes (MQTT 5, 2.2.2.2).
        body = b"\x09" + len(data).to_bytes(2, "big") + data
        self._packed = _variable_int(len(body)) + body

    def pack(self) -> bytes:
        return self._packed


def _variable_int(value: int) -> bytes:
    """MQTT's Variable Byte Integer (1.5.5)."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho has no annotations


def _connection(settings: MqttSettings, tls: ssl.SSLContext | None) -> dict[str, Any]:
    """What the daemon's link and the operator commands' peer connect with alike."""
    return {
        "hostname": settings.host,
        "port": settings.port,
        "username": settings.username,
        "password": settings.password.get_secret_value() if settings.password else None,
        "protocol": aiomqtt.ProtocolVersion.V5
        if settings.protocol == "5"
        else aiomqtt.ProtocolVersion.V311,
        "tls_context": tls,
        "tls_insecure": settings.tls.insecure if settings.tls.enabled else None,
        # Without it a reply written right after an acknowledgement waits ~40 ms (Nagle).
        "socket_options": [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        "timeout": 10,
    }


def build_tls_context(settings: MqttSettings) -> ssl.SSLContext | None:
    """Blocking (reads files): call once, off the event loop. A file that cannot be used is
    a ConfigError naming its key."""
    tls = settings.tls
    if not tls.enabled:
        return None
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except OSError as exc:
        raise ConfigError.unusable("mqtt.tls.ca_file", tls.ca_file, exc) from None
    if tls.insecure:
        context.check_hostname = False
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except OSError as exc:  # ssl.SSLError is one
            raise ConfigError.unusable(
                "mqtt.tls.cert_file", f"{tls.cert_file} (with {tls.key_file})", exc
            ) from None
    return context


def session_client(
    s: MqttSettings, tls: ssl.SSLContext | None, availability_topic: str
) -> aiomqtt.Client:
    """The daemon's client: a persistent session under its fixed id (MQTT 5: no clean start
    and a session expiry; 3.1.1: clean_session off), `offline` as its Last Will, manual
    acknowledgement."""
    v5 = s.protocol == "5"
    properties = None
    if v5:
        properties = _properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = s.session_expiry_s
        properties.ReceiveMaximum = s.max_in_flight
    client = aiomqtt.Client(
        **_connection(s, tls),
        identifier=s.client_id,
        clean_session=None if v5 else False,
        # paho refuses any clean_start but its neutral default on 3.1.1, where
        # clean_session=False alone keeps the session.
        clean_start=False if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        properties=properties,
        keepalive=s.keepalive_s,
        will=aiomqtt.Will(availability_topic, b"offline", qos=1, retain=True),
    )
    # aiomqtt 2.5 does not expose manual acknowledgement; paho has it. It must be on
    # before CONNECT: queued session messages may arrive before we subscribe again.
    client._client.manual_ack_set(True)
    return client


def trigger_options(s: MqttSettings) -> SubscribeOptions | None:
    """MQTT 5: Retain As Published, so that a retained message published while the daemon is
    subscribed still says it is retained (and is ignored as a trigger); MQTT 3.1.1 has no such
    option: the broker clears the flag on live delivery."""
    if s.protocol != "5":
        return None
    return SubscribeOptions(qos=1, retainAsPublished=True)


class MqttLink:
    """Owns the broker connection. `run(handler)` until `stop()`; `publish` any time."""

    def __init__(
        self,
        settings: MqttSettings,
        subscriptions: Sequence[str],
        availability_topic: str,
        *,
        on_connect: Callable[[], None] | None = None,
        on_disconnect: Callable[[], None] | None = None,
        tls: ssl.SSLContext | None = None,
        private_subscriptions: Sequence[str] = (),
    ) -> None:
        """`tls`: the broker's TLS context, when the caller built it already.
        `private_subscriptions`: never shared with other instances (what every instance must
        see: availability, retained states), unlike the requests."""
        self.settings = settings
        self.subscriptions = tuple(subscriptions)
        self.private_subscriptions = tuple(private_subscriptions)
        self.availability_topic = availability_topic
        self.connected = asyncio.Event()
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._client: aiomqtt.Client | None = None
        self._slots = asyncio.Semaphore(settings.max_in_flight)
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._say_offline = True
        self._tls: ssl.SSLContext | None = tls
        self._rng = random.Random()

    @property
    def v5(self) -> bool:
        return self.settings.protocol == "5"

    def _new_client(self) -> aiomqtt.Client:
        return session_client(self.settings, self._tls, self.availability_topic)

    def _subscription(self, topic_filter: str) -> str:
        group = self.settings.shared_group
        return f"$share/{group}/{topic_filter}" if group else topic_filter

    async def run(self, handler: Handler) -> None:
        """Connect, subscribe and hand each message to `handler` until `stop()`."""
        delay = self.settings.reconnect.min_s
        while not self._stopping.is_set():
            try:
                if self._tls is None and self.settings.tls.enabled:
                    self._tls = await asyncio.to_thread(build_tls_context, self.settings)
                await self._session(handler)
                delay = self.settings.reconnect.min_s
            except ConfigError as exc:
                # The daemon builds the context before the link starts; this covers a link
                # made without one. Retrying cannot help, and the daemon must not loop.
                logger.error("broker TLS: {}", exc)
                raise
            except aiomqtt.MqttError as exc:
                logger.warning(
                    "broker {}:{}: {}; reconnecting in at most {:.1f}s",
                    self.settings.host,
                    self.settings.port,
                    exc,
                    delay,
                )
            except Exception:
                # Whatever went wrong, the link must not die silently: log it and reconnect.
                logger.exception("broker link failed; reconnecting in at most {:.1f}s", delay)
            finally:
                self._client = None
                if self.connected.is_set():
                    self.connected.clear()
                    if self._on_disconnect:
                        self._on_disconnect()
            if self._stopping.is_set():
                break
            # Jitter (a wait between half and all of the delay) spreads the reconnects of many
            # instances after a broker restart.
            with_jitter = self._rng.uniform(delay / 2, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), with_jitter)
            delay = min(delay * 2, self.settings.reconnect.max_s)

    async def _session(self, handler: Handler) -> None:
        client = self._new_client()
        async with client:
            self._client = client
            options = trigger_options(self.settings)
            for topic_filter in self.subscriptions:
                # paho takes the QoS from the options when there are options.
                await client.subscribe(
                    self._subscription(topic_filter), qos=0 if options else 1, options=options
                )
            for topic_filter in self.private_subscriptions:
                await client.subscribe(topic_filter, qos=1)
            await client.publish(self.availability_topic, b"online", qos=1, retain=True)
            self.connected.set()
            if self._on_connect:
                self._on_connect()
            logger.info(
                "connected to broker {}:{} as {} (MQTT {}), subscribed to {}",
                self.settings.host,
                self.settings.port,
                self.settings.client_id,
                self.settings.protocol,
                ", ".join(self._subscription(f) for f in self.subscriptions),
            )
            await self._receive(client, handler)
            if not await self.drain(self.settings.stop_timeout_s):
                # Left unacknowledged: the broker delivers them again to the next session.
                for task in list(self._handlers):
                    task.cancel()
                logger.warning(
                    "stopped {} request(s) still in flight after {}s; the broker"
                    " will deliver them again",
                    len(self._handlers),
                    self.settings.stop_timeout_s,
                )
            if self._stopping.is_set() and self._say_offline:
                await client.publish(self.availability_topic, b"offline", qos=1, retain=True)

    async def _receive(self, client: aiomqtt.Client, handler: Handler) -> None:
        """Hand messages to handlers until `stop()`, at most `max_in_flight` at a time.

        The taking runs as a task of its own that `stop()` cancels: waiting on "a message or
        the stop" for every message cost a wait set up and torn down per trigger.
        """
        taking = asyncio.create_task(self._take(client, handler), name="mqtt-take-messages")
        stopping = asyncio.create_task(self._stopping.wait(), name="mqtt-wait-stop")
        try:
            await asyncio.wait({taking, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            taking.cancel()
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)
            try:
                await taking
            except asyncio.CancelledError:
                if not taking.cancelled():
                    raise  # this task itself is being cancelled

    async def _take(self, client: aiomqtt.Client, handler: Handler) -> None:
        messages = aiter(client.messages)
        while True:
            # Take a slot before taking a message: unacknowledged messages beyond
            # max_in_flight stay with the broker instead of piling up here.
            await self._slots.acquire()
            try:
                message = await anext(messages)
            except BaseException:
                self._slots.release()
                raise
            task = asyncio.create_task(
                self._handle(client, message, handler), name=f"mqtt-message-{message.mid}"
            )
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _handle(
        self, client: aiomqtt.Client, message: aiomqtt.Message, handler: Handler
    ) -> None:
        try:
            props = message.properties
            correlation = getattr(props, "CorrelationData", None) if props else None
            incoming = Incoming(
                topic=message.topic.value,
                payload=bytes(message.payload)
                if isinstance(message.payload, bytes | bytearray)
                else b"",
                retain=bool(message.retain),
                response_topic=getattr(props, "ResponseTopic", None) if props else None,
                correlation_data=bytes(correlation) if correlation is not None else None,
            )
            acknowledge = True
            try:
                await handler(incoming)
            except asyncio.CancelledError:
                acknowledge = False
                raise
            except Exception:
                # The handler answers every error it knows; anything else is a bug. The message
                # is not acknowledged, so the broker delivers it again after a reconnect.
                acknowledge = False
                logger.exception("handling a message on {} failed", incoming.topic)
            if acknowledge and message.qos > 0 and client is self._client:
                client._client.ack(message.mid, message.qos)
        finally:
            self._slots.release()

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait for the handlers in flight; True when all of them finished in time."""
        pending = set(self._handlers)
        if not pending:
            return True
        _, left = await asyncio.wait(pending, timeout=timeout)
        return not left

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        correlation_data: bytes | None = None,
    ) -> None:
        """Publish at QoS 1; MqttLinkError when there is no connection or the broker refuses."""
        client = self._client
        if client is None:
            raise MqttLinkError("not connected to the broker")
        properties = None
        if correlation_data is not None and self.v5:
            properties = cast(Properties, _CorrelationData(correlation_data))
        try:
            await client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        except (aiomqtt.MqttError, ValueError) as exc:
            raise MqttLinkError(f"publishing to {topic!r} failed: {exc}") from None

    def stop(self, *, offline: bool = True) -> None:
        """Stop taking messages; `run` finishes the handlers in flight, says `offline` (unless
        told not to: a reload reconnects at once), and returns."""
        self._say_offline = offline
        self._stopping.set()


def _why(exc: BaseException) -> str:
    """A broker connection failure in an operator's words."""
    text = str(exc)
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return f"TLS verification of the broker failed: {text}"
    if "code:135" in text or "code:134" in text or "Not authorized" in text:
        return f"the broker refused the login (wrong user name or password?): {text}"
    if "Connection refused" in text:
        return f"connection refused: is the broker listening there? ({text})"
    return text


class MqttPeer:
    """A plain client for the operator commands (check, demo): clean session, no Last Will.

    `async with MqttPeer(settings, client_id) as peer`, then `subscribe`, `publish`, and
    `messages()`; a failed connect raises MqttLinkError saying why.
    """

    def __init__(self, settings: MqttSettings, client_id: str) -> None:
        self.settings = settings
        self.client_id = client_id
        self._client: aiomqtt.Client | None = None

    async def __aenter__(self) -> MqttPeer:
        s = self.settings
        try:
            tls = await asyncio.to_thread(build_tls_context, s)
        except ConfigError as exc:
            raise MqttLinkError(f"a TLS file cannot be used: {exc}") from None
        self._client = aiomqtt.Client(**_connection(s, tls), identifier=self.client_id)
        try:
            await self._client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise MqttLinkError(_why(exc)) from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)

    async def subscribe(self, topic_filter: str) -> None:
        assert self._client is not None
        await self._client.subscribe(topic_filter, qos=1)

    async def publish(
        self, topic: str, payload: bytes, *, response_topic: str | None = None, retain: bool = False
    ) -> None:
        assert self._client is not None
        properties = None
        if response_topic is not None:
            properties = _properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = response_topic
        await self._client.publish(topic, payload, qos=1, retain=retain, properties=properties)

    async def messages(self) -> AsyncIterator[Incoming]:
        assert self._client is not None
        async for message in self._client.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            yield Incoming(message.topic.value, payload, bool(message.retain))
