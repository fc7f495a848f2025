"""Processes for the benchmarks: mosquitto, the QRS simulator, the daemon or the floor, and a
load generator on paho-mqtt. Everything on loopback, in a temporary folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# How long a process may take to start listening: a 10,000-task simulator on a loaded 2-core
# machine has needed more than 20 s.
STARTUP_S = 180.0


def wait_port(
    port: int, process: subprocess.Popen[bytes], what: str, timeout: float = STARTUP_S
) -> None:
    """Wait until `process` listens on `port`; it is stopped when it does not."""
    try:
        _wait_port(port, process, what, timeout)
    except BaseException:
        stop(process)
        raise


def _wait_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on {port}")


def cpu_s(pid: int) -> float:
    """User and system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Broker:
    folder: Path
    nodelay: bool = True
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        conf = self.folder / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence false\nmax_queued_messages 1000000\n"
            f"max_inflight_messages 100\n"
            f"set_tcp_nodelay {'true' if self.nodelay else 'false'}\n"
        )
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port, self.process, "mosquitto")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@dataclass
class Simulator:
    folder: Path
    tasks: dict[str, Any]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def certs(self) -> Path:
        return self.folder / "certs"

    def start(self) -> None:
        fixture = self.folder / f"tasks-{self.port}.yaml"
        fixture.write_text(yaml.safe_dump(self.tasks))
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mqtt_starter",
                "simulate-qrs",
                "--tasks",
                str(fixture),
                "--port",
                str(self.port),
                "--cert-dir",
                str(self.certs),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, self.process, "simulator")

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        context = ssl.create_default_context(cafile=str(self.certs / "root.pem"))
        context.load_cert_chain(self.certs / "client.pem", self.certs / "client_key.pem")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def journal(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/_sim/journal")
        return result

    def clear(self) -> None:
        self._call("DELETE", "/_sim/journal")

    def delay(self, seconds: float) -> None:
        self._call("POST", "/_sim/faults", {"delayS": seconds})

    def fire(self, task_id: str) -> str:
        """Start a task as its schedule would (no QRS API call)."""
        answer: dict[str, str] = self._call("POST", f"/_sim/tasks/{task_id}/fire")
        return answer["value"]

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@dataclass
class Target:
    """The daemon (`kind="daemon"`) or the floor, as a process."""

    kind: str
    folder: Path
    broker: Broker
    sim: Simulator
    events: bool = False
    mqtt: dict[str, Any] = field(default_factory=dict)  # more mqtt settings for the daemon
    sections: dict[str, Any] = field(default_factory=dict)  # more sections for the daemon
    env: dict[str, str] = field(default_factory=dict)  # more environment (MQTT_STARTER_LOOP)
    process: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0

    def start(self) -> None:
        log = (self.folder / f"{self.kind}.log").open("ab")
        if self.kind == "floor":
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.floor",
                    "127.0.0.1",
                    str(self.broker.port),
                    self.sim.url,
                    str(self.sim.certs),
                    "8",
                ],
                stdout=subprocess.PIPE,
                stderr=log,
            )
            assert self.process.stdout is not None
            began = time.monotonic()
            self.process.stdout.readline()
            self.startup_s = time.monotonic() - began
            return
        config = self.folder / "daemon.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "mqtt": {
                        "host": "127.0.0.1",
                        "port": self.broker.port,
                        "client_id": f"bench-{uuid.uuid4().hex[:6]}",
                        "session_expiry_s": 0,
                        **self.mqtt,
                    },
                    "qrs": {
                        "url": self.sim.url,
                        "cert_file": str(self.sim.certs / "client.pem"),
                        "key_file": str(self.sim.certs / "client_key.pem"),
                        "ca_file": str(self.sim.certs / "root.pem"),
                    },
                    "status": {"publish_task_events": self.events},
                    "policy": {"dedupe_window_s": 600, "max_tasks_per_request": 5000},
                    **self.sections,
                }
            )
        )
        notify_path = self.folder / f"notify-{uuid.uuid4().hex[:6]}.sock"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        # Short waits, so that a daemon that exits at start (a configuration it refuses) is
        # reported at once with its log, not after STARTUP_S.
        notify.settimeout(0.5)
        began = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MQTT_STARTER_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mqtt_starter", "run", "-c", str(config)],
            stdout=log,
            stderr=log,
            env={**env, **self.env, "NOTIFY_SOCKET": str(notify_path)},
            # Not the checkout: `python -m` puts the working folder first on the path, ahead
            # of a PYTHONPATH that names an earlier commit's tree (hotpath.py --before).
            cwd=self.folder,
        )
        try:
            while not self._ready(notify, began):
                pass
        except BaseException:
            stop(self.process)  # whatever fails, nothing is left running
            raise
        finally:
            notify.close()
        self.startup_s = time.monotonic() - began

    def log_tail(self, size: int = 3000) -> str:
        path = self.folder / f"{self.kind}.log"
        return path.read_text(errors="replace")[-size:] if path.exists() else ""

    def _ready(self, notify: socket.socket, began: float) -> bool:
        assert self.process is not None
        try:
            return b"READY=1" in notify.recv(4096)
        except TimeoutError:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the daemon exited ({self.process.returncode}) before READY:\n"
                    f"{self.log_tail()}"
                ) from None
            if time.monotonic() - began > STARTUP_S:
                raise
            return False

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


class LoadGen:
    """Requests over MQTT 5 with a response topic and correlation data, timed per request."""

    def __init__(self, broker: Broker) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"loadgen-{uuid.uuid4().hex[:6]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.max_inflight_messages_set(1000)
        self.reply_topic = f"bench/replies/{uuid.uuid4().hex[:6]}"
        self.sent: dict[bytes, float] = {}
        self.latencies: list[float] = []
        self.replies: list[Any] = []
        self.keep_replies = False
        self._lock = threading.Condition()
        self._on_reply: Any = None
        self.client.on_message = self._message
        connected = threading.Event()
        subscribed = threading.Event()

        def on_connect(c: mqtt.Client, *_: Any) -> None:
            sock = c.socket()
            if isinstance(sock, socket.socket):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.subscribe(self.reply_topic, qos=1)
            connected.set()

        self.client.on_connect = on_connect
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        if not (connected.wait(10) and subscribed.wait(10)):
            self.client.loop_stop()  # its network thread ends with it
            raise RuntimeError("load generator could not subscribe")

    def _message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        key = message.properties.CorrelationData
        with self._lock:
            sent = self.sent.pop(key, None)
            if sent is None:
                return
            self.latencies.append(now - sent)
            if self.keep_replies:
                self.replies.append(json.loads(message.payload))
            self._lock.notify_all()
        if self._on_reply is not None:
            self._on_reply()

    def publish(self, topic: str, payload: bytes = b"") -> None:
        key = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = key
        with self._lock:
            self.sent[key] = time.perf_counter()
        self.client.publish(topic, payload, qos=1, properties=props)

    def wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            while self.sent:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"{len(self.sent)} requests unanswered")
                self._lock.wait(left)

    def one_at_a_time(self, topics: list[str]) -> list[float]:
        self.latencies = []
        for topic in topics:
            self.publish(topic)
            self.wait_all(30)
        return list(self.latencies)

    def concurrent(self, topics: list[str], in_flight: int) -> float:
        """Seconds to answer all, keeping `in_flight` requests outstanding."""
        self.latencies = []
        pending = iter(topics)
        gate = threading.Semaphore(in_flight)
        self._on_reply = gate.release
        began = time.perf_counter()
        try:
            for topic in pending:
                if not gate.acquire(timeout=60):
                    raise RuntimeError("no reply within 60 s")
                self.publish(topic)
            self.wait_all(120)
        finally:
            self._on_reply = None
        return time.perf_counter() - began

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class Part(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


@contextlib.contextmanager
def running(*parts: Part) -> Iterator[None]:
    """Start `parts` in order; stop every one that was started, however the block ends."""
    with contextlib.ExitStack() as stack:
        for part in parts:
            stack.callback(part.stop)
            part.start()
        yield


@contextlib.contextmanager
def driving(target: Target, broker: Broker) -> Iterator[LoadGen]:
    """`target` started and a load generator on `broker`: both ended however the block ends,
    a load generator that cannot subscribe included."""
    with running(target):
        loadgen = LoadGen(broker)
        try:
            yield loadgen
        finally:
            loadgen.close()


@contextlib.contextmanager
def workspace() -> Iterator[Path]:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="mqtt-starter-bench-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
