"""A real mosquitto on a free loopback port, the daemon as a subprocess, and an MQTT test client.

The daemon is ready when it says READY=1 on a real datagram socket standing in for systemd's
NOTIFY_SOCKET, so no test sleeps to wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import getpass
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from unittest import mock

import aiomqtt
import pytest
import trustme
import yaml
from loguru import logger
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_starter.cli import main
from mqtt_starter.config import settings_from_mapping
from mqtt_starter.daemon import Daemon as AppDaemon
from mqtt_starter.simulators.qrs.server import QrsSimulator
from tests.conftest import free_port
from tests.integration import helpers

if shutil.which("mosquitto") is None:
    pytest.exit("mosquitto is not installed: run scripts/test.sh, which installs it", 1)


class Broker:
    """mosquitto with its own configuration, persistence folder and log, in `folder`.

    `namespace()` hands each test sharing the broker a namespace of its own: a base topic
    and a client id for the daemon, so that tests share no topic, retained message or session
    and nothing needs cleaning up after them. (mosquitto's per-listener `mount_point` would
    do it without changing any topic, but 2.0.11, Debian 12's, does not take the mount point
    off the messages it delivers.)
    """

    def __init__(self, folder: Path, *, head: str = "", extra: str = "") -> None:
        self.folder = folder
        self.port = free_port()
        self.head = head
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        # The daemon's client id and base topic on this broker (see `namespace`).
        self.client_id = "starter-test"
        self.base = "butler"
        self._namespaces = itertools.count()
        folder.mkdir(parents=True, exist_ok=True)

    def namespace(self) -> Broker:
        """This broker as one test sees it: the daemon's base topic `t<n>/butler` and client
        id `starter-test-<n>` are the test's own (client ids, and so sessions, are one
        namespace for the whole broker)."""
        n = next(self._namespaces)
        view = copy.copy(self)
        view.client_id = f"starter-test-{n}"
        view.base = f"t{n}/butler"
        return view

    @property
    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        conf = self.folder / "mosquitto.conf"
        conf.write_text(
            self.head + f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.folder}/\n"
            # Save on every change: a broker killed with SIGKILL then loses nothing queued.
            "autosave_interval 1\nautosave_on_changes true\n"
            # The default of 1000 queued messages per client would drop triggers of a burst.
            "max_queued_messages 100000\n"
            f"user {getpass.getuser()}\n"
            "set_tcp_nodelay true\n"
            f"log_dest file {self.folder}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n" + self.extra
        )
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mosquitto did not start:\n{self.log}")
            time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(10)
        self.process = None


@pytest.fixture(scope="module")
def shared_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def broker(shared_broker: Broker, monkeypatch: pytest.MonkeyPatch) -> Broker:
    """The module's broker in a namespace of the test's own: nothing to clean up after it,
    nothing another test left behind. A test that stops or kills its broker asks for
    `private_broker`."""
    view = shared_broker.namespace()
    # What the test publishes and expects follows (helpers.py).
    monkeypatch.setattr(helpers, "INSTANCE", view.client_id)
    monkeypatch.setattr(helpers, "BASE", view.base)
    return view


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of the test's own, for tests that stop or kill it."""
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


@pytest.fixture(params=["uvloop", "asyncio"])
def daemon_loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The event loop of the daemons this test starts, each in turn: uvloop (the default where
    it exists) and asyncio's own (Windows, MQTT_STARTER_LOOP=asyncio). The delivery and
    reliability promises are tested on both (`pytestmark = pytest.mark.usefixtures(...)`)."""
    loop: str = request.param
    monkeypatch.setenv("MQTT_STARTER_LOOP", loop)  # the daemon's process inherits it
    return loop


async def cli(*args: str) -> tuple[int, str, str]:
    """The command in this process (its output and exit code are all these tests look at),
    in a thread of its own: it runs its own event loop. Logging is left as the suite set it."""

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with (
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            mock.patch("mqtt_starter.cli.configure_logging"),
        ):
            code = main(list(args))
        return code, out.getvalue(), err.getvalue()

    return await asyncio.wait_for(asyncio.to_thread(run), 60)


class Notify:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def wait_for(self, line: str, timeout: float = 15.0, after: int = 0) -> None:
        """Wait for a datagram holding `line`, among those from number `after` on."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not any(line in m.splitlines() for m in self.messages[after:]):
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"no {line} from the daemon; got {self.messages}")
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), left)
            self.messages.append(data.decode())

    def close(self) -> None:
        self.sock.close()


def qrs_section(sim: QrsSimulator) -> dict[str, Any]:
    return {
        "url": sim.url,
        "cert_file": str(sim.certs.client),
        "key_file": str(sim.certs.client_key),
        "ca_file": str(sim.certs.root),
        "poll_interval_s": 0.05,
        "timeout_s": 5,
        "retry": {"attempts": 3, "backoff_s": 0.05, "max_backoff_s": 0.2},
    }


def daemon_config(broker: Broker, sim: QrsSimulator, **sections: Any) -> dict[str, Any]:
    return site_config(broker, "qrs", qrs_section(sim), **sections)


def site_config(
    broker: Broker, kind: str, section: dict[str, Any], **sections: Any
) -> dict[str, Any]:
    """A test daemon's configuration for a site (`kind` "qrs" or "cloud", and its section)."""
    config: dict[str, Any] = {
        "mqtt": {
            "host": "127.0.0.1",
            "port": broker.port,
            "client_id": broker.client_id,
            "base_topic": broker.base,
            "reconnect": {"min_s": 0.2, "max_s": 1.0},
            "stop_timeout_s": 10,
        },
        kind: section,
        "log": {"level": "DEBUG"},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **values}
        else:
            config[name] = values
    return config


def _limit_files(limit: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


class Daemon:
    """`mqtt-starter run` as a subprocess, as it runs in production."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.folder = folder
        self.config_path = folder / "mqtt-starter.yaml"
        self.config = config
        self.process: asyncio.subprocess.Process | None = None
        self.log_path = folder / "daemon.log"
        self.notify: Notify | None = None
        self.expects_traceback = False  # a test that provokes one says so
        # The module run with `python -m`: tests/windows_like.py runs the same command on an
        # event loop without signal handlers, as Windows' is.
        self.module = "mqtt_starter"
        self.unset_env: list[str] = []  # variables of the test run the daemon must not see
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        if config is not None:
            self.config = config
        self.config_path.write_text(yaml.safe_dump(self.config))

    async def start(
        self,
        *,
        wait_ready: bool = True,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
    ) -> None:
        """`nofile`: the process's file limit (as systemd's LimitNOFILE sets it)."""
        self.write_config()
        if self.notify is not None:
            self.notify.close()
        socket_path = self.folder / f"notify-{uuid.uuid4().hex[:8]}.sock"
        self.notify = Notify(socket_path)
        with self.log_path.open("a") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                self.module,
                "run",
                "-c",
                str(self.config_path),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={
                    **{k: v for k, v in os.environ.items() if k not in self.unset_env},
                    "NOTIFY_SOCKET": str(socket_path),
                    **(env or {}),
                },
                preexec_fn=(lambda: _limit_files(nofile)) if nofile is not None else None,
            )
        if wait_ready:
            try:
                await self.notify.wait_for("READY=1")
            except (AssertionError, TimeoutError):
                raise AssertionError(f"daemon not ready; its log:\n{self.log}") from None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    async def wait(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await self.wait()
            except TimeoutError:
                await self.kill()
        if self.notify is not None:
            self.notify.close()
            self.notify = None


Made = TypeVar("Made", "Daemon", "LocalDaemon")


@contextlib.asynccontextmanager
async def daemons(
    build: Callable[[dict[str, Any]], Made], config: Callable[..., dict[str, Any]]
) -> AsyncIterator[Callable[..., Awaitable[Made]]]:
    """`make(start=True, **sections)` for a test; every daemon it made is stopped after it."""
    made: list[Made] = []

    async def make(start: bool = True, **sections: Any) -> Made:
        d = build(config(**sections))
        made.append(d)
        if start:
            await d.start()
        return d

    try:
        yield make
    finally:
        for d in made:
            await d.stop()
    # A daemon process that logged a traceback logged an unexpected exception.
    broken = [d for d in made if isinstance(d, Daemon) and "Traceback (most recent" in d.log]
    if broken and not any(d.expects_traceback for d in broken):
        pytest.fail(f"a daemon logged an unexpected exception:\n{broken[0].log[-3000:]}")


@pytest.fixture
async def make_daemon(
    tmp_path: Path, broker: Broker, simulator: QrsSimulator
) -> AsyncIterator[Any]:
    count = itertools.count()
    async with daemons(
        lambda config: Daemon(tmp_path / f"daemon{next(count)}", config),
        lambda **sections: daemon_config(broker, simulator, **sections),
    ) as make:
        yield make


class LocalDaemon:
    """The daemon in the test's own event loop: the code `run` runs, without a process.

    For tests of behaviour that a process does not change (requests, replies, the HTTP door);
    delivery, signals, systemd and the CLI keep the real process (`Daemon`).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.lines: list[str] = []
        self.daemon: AppDaemon | None = None
        self._task: asyncio.Task[int] | None = None
        self._sink: int | None = None

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, *, wait_ready: bool = True) -> None:
        self._sink = logger.add(
            lambda m: self.lines.append(str(m.record["message"])), level="DEBUG"
        )
        self.daemon = AppDaemon(settings_from_mapping(self.config, {}))
        self._task = asyncio.create_task(self.daemon.run(), name="daemon-under-test")
        if wait_ready:
            ready = asyncio.create_task(self.daemon.ready.wait())
            await asyncio.wait({ready, self._task}, timeout=20, return_when="FIRST_COMPLETED")
            if not self.daemon.ready.is_set():
                ready.cancel()
                raise AssertionError(f"daemon not ready; its log:\n{self.log}")

    async def stop(self) -> None:
        if self.daemon is not None and self._task is not None:
            self.daemon.request_stop()
            await asyncio.wait_for(self._task, 20)
        if self._sink is not None:
            logger.remove(self._sink)
            self._sink = None


@pytest.fixture
async def make_local_daemon(broker: Broker, simulator: QrsSimulator) -> AsyncIterator[Any]:
    async with daemons(
        LocalDaemon, lambda **sections: daemon_config(broker, simulator, **sections)
    ) as make:
        yield make


@pytest.fixture
async def daemon(make_daemon: Any) -> Daemon:
    d: Daemon = await make_daemon()
    return d


def props(response_topic: str | None = None, correlation: bytes | None = None) -> Properties | None:
    if response_topic is None and correlation is None:
        return None
    p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if response_topic is not None:
        p.ResponseTopic = response_topic
    if correlation is not None:
        p.CorrelationData = correlation
    return p


class Received:
    def __init__(self, message: aiomqtt.Message) -> None:
        self.topic = message.topic.value
        self.payload = bytes(message.payload) if isinstance(message.payload, bytes) else b""
        self.retain = message.retain
        p = message.properties
        self.correlation = getattr(p, "CorrelationData", None) if p else None

    def json(self) -> Any:
        return json.loads(self.payload)


class AiomqttClient(aiomqtt.Client):
    """aiomqtt's client without a race of its own: it asks the loop to watch the socket for
    writing one turn later, and when the broker was killed meanwhile the socket is closed by
    then: the loop logs EBADF, which the test would count as an unexpected exception."""

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        def watch() -> None:
            if client.socket() is sock:  # paho drops its socket when it closes it
                self._loop.add_writer(sock.fileno(), write)

        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # a broken connection: aiomqtt reports it as lost
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        self._loop.call_soon_threadsafe(watch)


class Client:
    """A test's MQTT client: everything it receives lands in a list it can wait on."""

    def __init__(
        self,
        broker: Broker,
        *,
        v5: bool = True,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.client = AiomqttClient(
            "127.0.0.1",
            broker.port,
            identifier=client_id or f"test-{uuid.uuid4().hex[:8]}",
            username=username,
            password=password,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            # Without it a publish waits ~40 ms behind the PUBACK of a received reply (Nagle).
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            max_inflight_messages=100,
        )
        self.received: list[Received] = []
        self._changed = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Client:
        await self.client.__aenter__()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for message in self.client.messages:
            self.received.append(Received(message))
            self._changed.set()

    async def subscribe(self, *topics: str) -> None:
        for topic in topics:
            await self.client.subscribe(topic, qos=1)

    async def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any] | list[Any] = b"",
        *,
        retain: bool = False,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        qos: int = 1,
    ) -> None:
        if isinstance(payload, dict | list):
            payload = json.dumps(payload)
        await self.client.publish(
            topic, payload, qos=qos, retain=retain, properties=props(response_topic, correlation)
        )

    def on(self, topic_filter: str) -> list[Received]:
        return [r for r in self.received if aiomqtt.Topic(r.topic).matches(topic_filter)]

    async def wait_for(
        self,
        topic_filter: str,
        count: int = 1,
        timeout: float = 15.0,
        until: Callable[[Received], bool] | None = None,
    ) -> list[Received]:
        """Every message on `topic_filter` once there are `count` of them (or, with `until`,
        one that satisfies it), waiting up to `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def enough() -> bool:
            got = self.on(topic_filter)
            if until is not None:
                return any(until(r) for r in got)
            return len(got) >= count

        while not enough():
            left = deadline - loop.time()
            if left <= 0:
                seen = [(r.topic, r.payload[:200]) for r in self.received]
                raise AssertionError(f"expected {count} message(s) on {topic_filter}; got {seen}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        # Everything received so far, not a slice: a test that expects one reply fails when
        # two came.
        return self.on(topic_filter)

    async def request(self, topic: str, payload: Any = b"", **kwargs: Any) -> Any:
        """Publish with a fresh MQTT 5 response topic and return the decoded reply."""
        reply_topic = f"test/reply/{uuid.uuid4().hex}"
        await self.subscribe(reply_topic)
        await self.publish(topic, payload, response_topic=reply_topic, **kwargs)
        [reply] = await self.wait_for(reply_topic)
        return reply.json()


@pytest.fixture
async def mqtt(broker: Broker) -> AsyncIterator[Client]:
    async with Client(broker) as client:
        yield client


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[Broker, int, Path]]:
    """Two listeners: plain and anonymous for the test client, TLS with a client certificate
    and a password file for the daemon."""
    ca = trustme.CA()
    folder = tmp_path / "tls-broker"
    folder.mkdir()
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(folder / "server.pem"))
    server.private_key_pem.write_to_path(str(folder / "server_key.pem"))
    client = ca.issue_cert("mqtt-starter")
    client.cert_chain_pems[0].write_to_path(str(folder / "client.pem"))
    client.private_key_pem.write_to_path(str(folder / "client_key.pem"))
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(folder / "passwd"), "starter", "pw-789"],
        check=True,
        capture_output=True,
    )
    tls_port = free_port()
    broker = Broker(
        folder,
        head="per_listener_settings true\n",
        extra=(
            f"listener {tls_port} 127.0.0.1\n"
            f"cafile {folder}/ca.pem\ncertfile {folder}/server.pem\n"
            f"keyfile {folder}/server_key.pem\n"
            "require_certificate true\n"
            f"allow_anonymous false\npassword_file {folder}/passwd\n"
        ),
    )
    broker.start()
    yield broker, tls_port, folder
    broker.stop()


def tls_settings(port: int, folder: Path, password: str) -> dict[str, Any]:
    return {
        "host": "localhost",
        "port": port,
        "username": "starter",
        "password": password,
        "tls": {
            "enabled": True,
            "ca_file": str(folder / "ca.pem"),
            "cert_file": str(folder / "client.pem"),
            "key_file": str(folder / "client_key.pem"),
        },
    }
