"""The broker connection: the only module that imports the MQTT library (paho).

paho is driven from the event loop itself: its socket is read and written through the loop's
reader and writer callbacks (one `recv` per wake-up, whatever paho asks for), its keepalive runs
on a timer, a publish waits on one future per message id. No thread, no queue and no timeout
per message: a received message becomes the one task that handles it. A trigger and the
PUBACK of a reply are read without paho's Properties objects (packets.py). Only the blocking
connect (name lookup, TCP, TLS handshake) runs in a thread.

What it promises (mqtt-notes.md):
- a fixed client id and a persistent session (v5: clean_start=False and a Session Expiry
  Interval; 3.1.1: clean_session=False), so triggers published while the daemon is away wait;
- manual acknowledgement: a QoS 1 message is acked only when its handler returned, and only
  on the connection it arrived on (a mid means nothing on the next one: the broker redelivers);
- at most `max_in_flight` handlers at once (also sent as MQTT 5 Receive Maximum): what arrives
  beyond it waits here unacknowledged, and the broker holds the rest;
- a reply is acknowledged by the broker (PUBACK) before the trigger it answers is acknowledged;
- TCP_NODELAY, `online` retained after every connect, `offline` as the Last Will and before a
  clean stop; reconnect with jittered exponential backoff, subscribing again each time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import random
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import paho.mqtt.client as paho
from loguru import logger
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from mqtt_starter.config import MqttSettings
from mqtt_starter.core.errors import ConfigError, MqttLinkError
from mqtt_starter.mqtt.packets import read_publish

CONNECT_TIMEOUT_S = 10.0
# How often paho's keepalive bookkeeping runs (it sends PINGREQ when due and notices a silent
# broker); a second is what paho's own loop uses.
MISC_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class Incoming:
    """A received message, as the rest of the daemon sees it."""

    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None


Handler = Callable[[Incoming], Awaitable[None]]


class _Client(paho.Client):
    """paho's client, reading the socket in one call per wake-up, and the two packets of every
    request without paho's `Properties`.

    paho reads a packet a few bytes at a time (its type, each byte of its length, then its
    body), one `recv` each, and tries once more to find the socket empty: about six system
    calls per request. Here one `recv` takes what the socket has, and paho's reads are served
    from it. `buffered()` says whether bytes wait here, where the event loop cannot see them.

    A PUBLISH at QoS 0 or 1 is read by packets.py, and a PUBACK without a reason code or
    properties (success) by its packet id alone: paho's `Properties` and `ReasonCode` objects
    cost more than the rest of receiving them. Anything else, and anything odd, paho reads as
    it always did. The methods overridden, and the attributes they use, are the same in paho
    2.1 and 2.2 (paho is pinned below 3).
    """

    # Enough for what a broker sends between two wake-ups; a larger packet takes a few reads.
    CHUNK = 65536

    _inbox = b""
    _at = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # What a two-byte PUBACK says, made once.
        self._success = (
            ReasonCode(PacketTypes.PUBACK, identifier=0),
            _properties(PacketTypes.PUBACK),
        )

    def buffered(self) -> bool:
        return self._at < len(self._inbox)

    def _handle_publish(self) -> MQTTErrorCode:
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        read = read_publish(self._in_packet["packet"], qos, v5=self._protocol == paho.MQTTv5)
        if read is None:
            return super()._handle_publish()
        message = paho.MQTTMessage(mid=read.mid, topic=read.topic)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.dup = bool(header & 0x08)
        if self._protocol == paho.MQTTv5:
            message.properties = cast(
                Properties, _ReadProperties(read.response_topic, read.correlation_data)
            )
        message.payload = read.payload
        message.timestamp = time.monotonic()
        self._handle_on_message(message)
        if qos and not self._manual_ack:
            return self._send_puback(read.mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2:
            return super()._handle_pubackcomp(cmd)
        # Two bytes: the packet id, and success (MQTT 5, 3.4.2.1: a reason code of 0 and no
        # properties may be left out; 3.1.1 has neither).
        mid = int.from_bytes(packet, "big")
        with self._out_message_mutex:
            if mid in self._out_messages:  # told once, as paho does
                return self._do_on_publish(mid, *self._success)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._at >= len(self._inbox):
            data = super()._sock_recv(self.CHUNK)  # BlockingIOError when the socket is empty
            if len(data) <= bufsize:
                return data  # the whole of it is asked for, or the broker closed (b"")
            self._inbox, self._at = data, 0
        end = self._at + bufsize
        chunk = self._inbox[self._at : end]
        self._at = end
        if end >= len(self._inbox):
            self._inbox, self._at = b"", 0  # all served: nothing kept until the next read
        return chunk


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho has no annotations


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


class _ReadProperties:
    """A received PUBLISH's properties as packets.py read them, under paho's names: the link
    reads these and paho's own alike."""

    __slots__ = ("CorrelationData", "ResponseTopic")

    def __init__(self, response_topic: str | None, correlation_data: bytes | None) -> None:
        if response_topic is not None:
            self.ResponseTopic = response_topic
        if correlation_data is not None:
            self.CorrelationData = correlation_data


def _variable_int(value: int) -> bytes:
    """MQTT's Variable Byte Integer (1.5.5)."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


def _incoming(message: paho.MQTTMessage) -> Incoming:
    props = message.properties
    response_topic = correlation = None
    if props is not None:
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
    return Incoming(
        message.topic,
        bytes(message.payload),
        bool(message.retain),
        response_topic,
        bytes(correlation) if correlation is not None else None,
    )


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


class _SocketDriver:
    """A paho client's socket, read and written from the running event loop.

    paho's socket callbacks are this class's: the socket is watched for reading once paho has
    opened it, a write is made on the loop's next turn, and keepalive runs on a timer. `end`
    drops the socket whatever paho says and tells `on_end` why; paho's own end of the
    connection reaches its `on_disconnect` instead.
    """

    def __init__(self, client: _Client, on_end: Callable[[str], None]) -> None:
        self.client = client
        self._on_end = on_end
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._fd = -1
        self._flush_due = False
        self._writer_added = False
        self._misc: asyncio.TimerHandle | None = None
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write

    def _on_loop(self, callback: Callable[..., object], *args: Any) -> None:
        """paho calls back from the connect thread too: what touches the loop runs on it."""
        if threading.get_ident() == self._loop_thread:
            callback(*args)
        else:
            self._loop.call_soon_threadsafe(callback, *args)

    def _socket_open(self, _client: Any, _userdata: Any, sock: Any) -> None:
        # Without it a reply written right after an acknowledgement waits ~40 ms (Nagle).
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._fd = sock.fileno()
        self._on_loop(self._watch, self._fd)

    def _watch(self, fd: int) -> None:
        if fd != self._fd:
            return  # closed again before the loop got to it
        self._loop.add_reader(fd, self._read)
        self._misc = self._loop.call_later(MISC_INTERVAL_S, self._tick)

    def _socket_close(self, _client: Any, _userdata: Any, _sock: Any) -> None:
        fd, self._fd = self._fd, -1
        self._on_loop(self._unwatch, fd)

    def _unwatch(self, fd: int) -> None:
        # By descriptor number: paho closes the socket right after this callback.
        for remove in (self._loop.remove_reader, self._loop.remove_writer):
            with contextlib.suppress(OSError, ValueError):
                remove(fd)
        self._writer_added = False
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None

    def _register_write(self, _client: Any, _userdata: Any, _sock: Any) -> None:
        self._on_loop(self._want_write)

    def _want_write(self) -> None:
        """Something waits to be written: write it on the loop's next turn, with whatever
        else is queued by then. A socket is nearly always writable, so waiting for the loop to
        say so (add_writer, a wake-up, remove_writer) would cost more than the write."""
        if self._fd >= 0 and not self._flush_due:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if self._fd < 0:
            return
        self._write()
        if self._fd >= 0 and self.client.want_write() and not self._writer_added:
            # The socket's buffer is full: now let the loop say when it drains.
            self._loop.add_writer(self._fd, self._write)
            self._writer_added = True

    def _unregister_write(self, _client: Any, _userdata: Any, _sock: Any) -> None:
        if self._writer_added and self._fd >= 0:
            self._writer_added = False
            fd = self._fd
            self._on_loop(lambda: self._loop.remove_writer(fd))

    def _read(self) -> None:
        client = self.client
        try:
            client.loop_read()
            # paho reads at most as many packets as it has messages in flight: what it left
            # in the buffer, the loop would not announce again.
            while client.buffered() and self._fd >= 0:
                client.loop_read()
        except Exception as exc:  # paho lets some socket errors through: the connection is over
            self.end(f"reading from the broker failed: {exc}")
            return
        # Over TLS, records already decrypted wait in the SSL object, not in the socket: the
        # loop would not call again until more bytes arrive (paho's own loop checks the same).
        pending = getattr(self.client.socket(), "pending", None)
        if pending is not None and pending():
            self._loop.call_soon(self._read)

    def _write(self) -> None:
        try:
            self.client.loop_write()
        except Exception as exc:
            self.end(f"writing to the broker failed: {exc}")

    def _tick(self) -> None:
        self._misc = None
        try:
            self.client.loop_misc()
        except Exception as exc:
            self.end(f"the broker connection failed: {exc}")
            return
        if self._fd >= 0:
            self._misc = self._loop.call_later(MISC_INTERVAL_S, self._tick)

    def end(self, reason: str) -> None:
        """The connection is over whatever paho says: drop the socket and say why."""
        if self._fd >= 0:
            self._unwatch(self._fd)
            self._fd = -1
        # paho has no public way to drop a socket without a DISCONNECT (which would cancel the
        # Last Will); this client is never used again after it.
        with contextlib.suppress(Exception):
            self.client._sock_close()
        self._on_end(reason)


class _Connection:
    """One connection to the broker: a paho client driven by the running event loop.

    `open()` connects (the blocking part in a thread) and waits for CONNACK; `lost` is done
    when the connection ends, with the reason. Every other method runs on the loop.
    """

    def __init__(
        self,
        settings: MqttSettings,
        tls: ssl.SSLContext | None,
        client_id: str,
        on_message: Callable[[paho.MQTTMessage], None],
        *,
        session: bool,
        will_topic: str | None = None,
    ) -> None:
        """`session`: the daemon's persistent session with manual acknowledgement; otherwise
        a clean session that paho acknowledges itself (the operator commands)."""
        self.settings = settings
        self.v5 = settings.protocol == "5"
        self._loop = asyncio.get_running_loop()
        self._session = session
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
            clean_session=None if self.v5 else not session,
        )
        if settings.username is not None:
            password = settings.password.get_secret_value() if settings.password else None
            client.username_pw_set(settings.username, password)
        if tls is not None:
            client.tls_set_context(tls)
            if settings.tls.insecure:
                client.tls_insecure_set(True)
        if will_topic is not None:
            client.will_set(will_topic, b"offline", qos=1, retain=True)
        # Before CONNECT: queued session messages may arrive before we subscribe again.
        client.manual_ack_set(session)
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_publish = self._published
        client.on_subscribe = self._subscribed
        client.on_message = lambda _client, _userdata, message: on_message(message)
        self.client = client
        self._socket = _SocketDriver(client, self._lost)
        self._connack: asyncio.Future[None] = self._loop.create_future()
        self.lost: asyncio.Future[str] = self._loop.create_future()
        self._publishes: dict[int, asyncio.Future[None]] = {}
        self._subscribes: dict[int, asyncio.Future[list[ReasonCode]]] = {}

    def _lost(self, reason: str) -> None:
        if not self.lost.done():
            self.lost.set_result(reason)
        error = MqttLinkError(f"the broker connection was lost: {reason}")
        waits: list[asyncio.Future[Any]] = [
            self._connack,
            *self._publishes.values(),
            *self._subscribes.values(),
        ]
        for waiting in waits:
            if not waiting.done():
                waiting.set_exception(error)
                # Marked as seen: whoever still awaits it gets the error all the same, and a
                # wait given up meanwhile (a connect whose caller stopped waiting for the
                # CONNACK) lost nothing, since `lost` says why the connection ended.
                waiting.exception()
        self._publishes.clear()
        self._subscribes.clear()

    # -- paho's callbacks (on the loop: they run inside loop_read/loop_write/loop_misc) --------

    def _connected(
        self, _client: Any, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(
                MqttLinkError(f"the broker refused the connection: {reason} (code {reason.value})")
            )
        else:
            self._connack.set_result(None)

    def _disconnected(
        self, _client: Any, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        self._lost(str(reason))

    def _published(
        self, _client: Any, _userdata: Any, mid: int, reason: ReasonCode, _props: Any
    ) -> None:
        waiting = self._publishes.pop(mid, None)
        if waiting is None or waiting.done():
            return
        if reason.is_failure:
            waiting.set_exception(MqttLinkError(f"the broker refused the publication: {reason}"))
        else:
            waiting.set_result(None)

    def _subscribed(
        self, _client: Any, _userdata: Any, mid: int, reasons: list[ReasonCode], _props: Any
    ) -> None:
        waiting = self._subscribes.pop(mid, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(reasons)

    # -- what the link and the peer use -------------------------------------------------------

    async def open(self, properties: Properties | None = None) -> None:
        s = self.settings
        connect = functools.partial(
            self.client.connect,
            s.host,
            s.port,
            s.keepalive_s,
            # paho refuses any clean_start but its neutral default on 3.1.1, where
            # clean_session (above) alone says whether the session is kept.
            clean_start=(not self._session) if self.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self.client.connect_timeout = CONNECT_TIMEOUT_S
        try:
            await self._loop.run_in_executor(None, connect)
            await asyncio.wait_for(asyncio.shield(self._connack), CONNECT_TIMEOUT_S)
        except MqttLinkError:
            self.close()
            raise
        except (OSError, TimeoutError, ValueError) as exc:
            self.close()
            raise MqttLinkError(str(exc) or type(exc).__name__) from None

    def close(self) -> None:
        """Drop the connection without a DISCONNECT (the broker sends the Last Will)."""
        self._socket.end("closed")

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        properties: Properties | None = None,
    ) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK."""
        if self.lost.done():
            raise MqttLinkError(f"not connected to the broker ({self.lost.result()})")
        try:
            info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        except ValueError as exc:
            raise MqttLinkError(f"publishing to {topic!r} failed: {exc}") from None
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise MqttLinkError(f"publishing to {topic!r} failed: {paho.error_string(info.rc)}")
        waiting: asyncio.Future[None] = self._loop.create_future()
        self._publishes[info.mid] = waiting
        await waiting

    async def subscribe(self, topic_filter: str, options: SubscribeOptions | None = None) -> None:
        """Subscribe (QoS 1, or as `options` say) and wait for the SUBACK; MqttLinkError when
        the broker refuses."""
        if options is not None:
            rc, mid = self.client.subscribe(topic_filter, options=options)
        else:
            rc, mid = self.client.subscribe(topic_filter, qos=1)
        if rc != paho.MQTT_ERR_SUCCESS or mid is None:
            raise MqttLinkError(f"subscribing to {topic_filter!r} failed: {paho.error_string(rc)}")
        waiting: asyncio.Future[list[ReasonCode]] = self._loop.create_future()
        self._subscribes[mid] = waiting
        reasons = await waiting
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            raise MqttLinkError(
                f"the broker refused the subscription {topic_filter!r}: {refused[0]}"
            )

    def ack(self, mid: int, qos: int) -> None:
        if not self.lost.done():
            self.client.ack(mid, qos)

    async def disconnect(self, timeout: float = 5.0) -> None:
        """A clean DISCONNECT (no Last Will), then wait for the socket to close."""
        if self.lost.done():
            return
        self.client.disconnect()
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), timeout)
        except TimeoutError:
            self.close()


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
        self._connection: _Connection | None = None
        self._handler: Handler | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        # Arrived while max_in_flight handlers run, or while stopping: not acknowledged.
        self._waiting: collections.deque[tuple[_Connection, paho.MQTTMessage]] = collections.deque()
        self._stopping = asyncio.Event()
        self._say_offline = True
        self._tls: ssl.SSLContext | None = tls
        self._rng = random.Random()

    @property
    def v5(self) -> bool:
        return self.settings.protocol == "5"

    def _subscription(self, topic_filter: str) -> str:
        group = self.settings.shared_group
        return f"$share/{group}/{topic_filter}" if group else topic_filter

    async def run(self, handler: Handler) -> None:
        """Connect, subscribe and hand each message to `handler` until `stop()`."""
        self._handler = handler
        delay = self.settings.reconnect.min_s
        while not self._stopping.is_set():
            try:
                if self._tls is None and self.settings.tls.enabled:
                    self._tls = await asyncio.to_thread(build_tls_context, self.settings)
                await self._session()
                delay = self.settings.reconnect.min_s
            except ConfigError as exc:
                # The daemon builds the context before the link starts; this covers a link
                # made without one. Retrying cannot help, and the daemon must not loop.
                logger.error("broker TLS: {}", exc)
                raise
            except MqttLinkError as exc:
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
                if self._connection is not None:
                    self._connection.close()
                self._connection = None
                self._waiting.clear()  # unacknowledged: the broker delivers them again
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

    def _connect_properties(self) -> Properties | None:
        if not self.v5:
            return None
        properties = _properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = self.settings.session_expiry_s
        properties.ReceiveMaximum = self.settings.max_in_flight
        return properties

    async def _session(self) -> None:
        s = self.settings
        connection = _Connection(
            s,
            self._tls,
            s.client_id,
            self._arrived,
            session=True,
            will_topic=self.availability_topic,
        )
        self._connection = connection
        await connection.open(self._connect_properties())
        options = trigger_options(s)
        for topic_filter in self.subscriptions:
            await connection.subscribe(self._subscription(topic_filter), options)
        for topic_filter in self.private_subscriptions:
            await connection.subscribe(topic_filter)
        await connection.publish(self.availability_topic, b"online", retain=True)
        self.connected.set()
        if self._on_connect:
            self._on_connect()
        logger.info(
            "connected to broker {}:{} as {} (MQTT {}), subscribed to {}",
            s.host,
            s.port,
            s.client_id,
            s.protocol,
            ", ".join(self._subscription(f) for f in self.subscriptions),
        )
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            either: set[asyncio.Future[Any]] = {stopping, connection.lost}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if connection.lost.done():
            raise MqttLinkError(connection.lost.result())
        if not await self.drain(s.stop_timeout_s):
            # Left unacknowledged: the broker delivers them again to the next session.
            for task in list(self._handlers):
                task.cancel()
            logger.warning(
                "stopped {} request(s) still in flight after {}s; the broker will deliver them"
                " again",
                len(self._handlers),
                s.stop_timeout_s,
            )
        if self._say_offline:
            await connection.publish(self.availability_topic, b"offline", retain=True)
        await connection.disconnect()

    def _arrived(self, message: paho.MQTTMessage) -> None:
        """paho's on_message, on the loop: start its handler, or keep it unacknowledged until a
        handler slot is free."""
        connection = self._connection
        if connection is None:
            return
        if len(self._handlers) < self.settings.max_in_flight and not self._stopping.is_set():
            self._start(connection, message)
        else:
            self._waiting.append((connection, message))

    def _start(self, connection: _Connection, message: paho.MQTTMessage) -> None:
        task = asyncio.create_task(self._handle(connection, message))
        self._handlers.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        while (
            self._waiting
            and len(self._handlers) < self.settings.max_in_flight
            and not self._stopping.is_set()
        ):
            connection, message = self._waiting.popleft()
            if connection is self._connection:
                self._start(connection, message)

    async def _handle(self, connection: _Connection, message: paho.MQTTMessage) -> None:
        assert self._handler is not None
        try:
            incoming = _incoming(message)
            await self._handler(incoming)
        except Exception:
            # The handler answers every error it knows; anything else is a bug. The message is
            # not acknowledged, so the broker delivers it again after a reconnect.
            logger.exception("handling a message on {} failed", message.topic)
            return
        if message.qos > 0 and connection is self._connection:
            connection.ack(message.mid, message.qos)

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
        connection = self._connection
        if connection is None or not self.connected.is_set():
            raise MqttLinkError("not connected to the broker")
        properties = None
        if correlation_data is not None and self.v5:
            properties = cast(Properties, _CorrelationData(correlation_data))
        await connection.publish(topic, payload, retain=retain, properties=properties)

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
    if "Not authorized" in text or "Bad user name or password" in text:
        refusal = text.removeprefix("the broker refused the connection: ")
        return f"the broker refused the login (wrong user name or password?): {refusal}"
    if "Connection refused" in text:
        return f"connection refused: is the broker listening there? ({text})"
    return text


class MqttPeer:
    """A plain client for the operator commands (check, demo, trigger): clean session, no Last
    Will.

    `async with MqttPeer(settings, client_id) as peer`, then `subscribe`, `publish`, and
    `messages()`; a failed connect raises MqttLinkError saying why.
    """

    def __init__(self, settings: MqttSettings, client_id: str) -> None:
        self.settings = settings
        self.client_id = client_id
        self._connection: _Connection | None = None
        self._received: asyncio.Queue[Incoming] = asyncio.Queue()

    async def __aenter__(self) -> MqttPeer:
        s = self.settings
        try:
            tls = await asyncio.to_thread(build_tls_context, s)
        except ConfigError as exc:
            raise MqttLinkError(f"a TLS file cannot be used: {exc}") from None
        self._connection = _Connection(
            s,
            tls,
            self.client_id,
            lambda message: self._received.put_nowait(_incoming(message)),
            session=False,
        )
        try:
            await self._connection.open()
        except MqttLinkError as exc:
            raise MqttLinkError(_why(exc)) from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.disconnect()

    @property
    def _open(self) -> _Connection:
        assert self._connection is not None, "use MqttPeer in `async with`"
        return self._connection

    async def subscribe(self, topic_filter: str) -> None:
        await self._open.subscribe(topic_filter)

    async def publish(
        self, topic: str, payload: bytes, *, response_topic: str | None = None, retain: bool = False
    ) -> None:
        properties = None
        if response_topic is not None:
            properties = _properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = response_topic
        await self._open.publish(topic, payload, retain=retain, properties=properties)

    async def messages(self) -> AsyncIterator[Incoming]:
        connection = self._open
        while True:
            getting = asyncio.ensure_future(self._received.get())
            either: set[asyncio.Future[Any]] = {getting, connection.lost}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():
                getting.cancel()
                raise MqttLinkError(f"the broker connection was lost: {connection.lost.result()}")
            yield getting.result()
