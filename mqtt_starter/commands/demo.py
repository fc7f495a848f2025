"""`mqtt-starter demo`: a private broker, the QRS simulator and the daemon, end to end.

Everything runs on loopback in a temporary folder: mosquitto on a free port, the simulator
(in this process) with the sample tasks, and `mqtt-starter run` as a child process, ready when
it says READY=1 on a notify socket as it would to systemd. Then a short tour publishes real
triggers and prints each reply and status event as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TextIO

import yaml
from aiohttp import web

from mqtt_starter.config import MqttSettings
from mqtt_starter.mqtt.link import MqttPeer
from mqtt_starter.ops.platform import StopSignals
from mqtt_starter.simulators.certs import ensure_certificates
from mqtt_starter.simulators.cloud.fixtures import load_cloud_fixture
from mqtt_starter.simulators.cloud.server import CloudSimulator
from mqtt_starter.simulators.qrs.fixtures import load_fixture
from mqtt_starter.simulators.qrs.server import QrsSimulator

SALES = "6ca1c5f2-2742-44d5-8adf-d6cba3701a4e"
CLOUD_SALES = "3a1f6c2e-8b4d-4e7a-9c0f-1d2e3f4a5b6c"  # Sales Dashboard, in the sample tenant
WEB_SHOP = "0c5d9f1e-2a3b-4d8c-a47f-6b9c0d1e2f3a"  # its schedule's run fails
# When the Web Shop's run fails, clean up and tell people (a text webhook, as Slack takes it).
DEMO_CHAIN = {
    "name": "cleanup-after-shop",
    "after": {"task_ids": [WEB_SHOP]},
    "on": "failure",
    "start": {"tags": ["Maintenance"]},
    "wait": True,
}


class DemoError(Exception):
    """The demo cannot run (no mosquitto, a port taken): said in one line."""

    pass


# MQTT's own port: the example Node-RED flow and mosquitto_rr connect there as they are.
DEFAULT_BROKER_PORT = 1883
# The status page's, when it is free.
DEFAULT_PAGE_PORT = 8080


def _free_port(wanted: int = 0) -> int:
    """`wanted` when nothing listens there, else a port the kernel chooses."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", wanted))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_port(port: int, process: asyncio.subprocess.Process, what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise DemoError(f"{what} exited with code {process.returncode}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise DemoError(f"{what} did not listen on port {port} within 10 s")


@contextlib.asynccontextmanager
async def _broker(folder: Path, wanted: int) -> AsyncIterator[int]:
    binary = shutil.which("mosquitto")
    if binary is None:
        raise DemoError(
            "mosquitto is not installed (Debian: apt-get install mosquitto), or run"
            " scripts/demo.sh, which installs it"
        )
    port = _free_port(wanted)
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"persistence false\nset_tcp_nodelay true\n"
        f"log_dest file {folder}/mosquitto.log\n"
    )
    process = await asyncio.create_subprocess_exec(
        binary,
        "-c",
        str(conf),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await _wait_port(port, process, "mosquitto")
        yield port
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


@contextlib.asynccontextmanager
async def _daemon(folder: Path, config: dict[str, Any]) -> AsyncIterator[Path]:
    config_path = folder / "mqtt-starter.yaml"
    config_path.write_text(yaml.safe_dump(config))
    notify_path = folder / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    log = (folder / "daemon.log").open("w")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mqtt_starter",
        "run",
        "-c",
        str(config_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        # The demo's configuration is complete: overrides meant for a real daemon stay out.
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("MQTT_STARTER_")},
            "NOTIFY_SOCKET": str(notify_path),
        },
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            left = deadline - loop.time()
            if left <= 0 or process.returncode is not None:
                raise DemoError(f"the daemon did not get ready; see {folder}/daemon.log")
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(loop.sock_recv(notify, 4096), min(left, 0.5))
                if "READY=1" in data.decode().splitlines():
                    break
        yield config_path
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
        log.close()
        notify.close()


class Receiver:
    """A webhook receiver on loopback: what a chat tool's incoming webhook would get."""

    def __init__(self) -> None:
        self.got: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = _free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        await self.got.put(await request.json())
        return web.Response(status=204)


class Tour:
    """Publishes triggers and prints what comes back, as it comes back."""

    def __init__(self, peer: MqttPeer, out: TextIO) -> None:
        self.peer = peer
        self.out = out
        self.replies: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.started = time.monotonic()
        self.names: dict[str, str] = {}
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.chained: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    async def listen(self) -> None:
        async for message in self.peer.messages():
            try:
                data = json.loads(message.payload)
            except ValueError:
                continue
            if message.topic.startswith("butler/status/task/"):
                elapsed = time.monotonic() - self.started
                extra = f" in {data['durationMs'] / 1000:.1f} s" if data.get("stopTime") else ""
                note = f" ({data['message']})" if data["stateCode"] in (8, 11) else ""
                self.say(
                    f"      [{elapsed:5.1f} s] status  {data['taskName']}: "
                    f"{data['state']}{extra}{note}"
                )
            elif message.topic.startswith("butler/event/task/"):
                await self.events.put(data)
            elif message.topic.startswith("butler/reply/chain/"):
                await self.chained.put(data)
            elif message.topic in self.replies:
                await self.replies[message.topic].put(data)

    async def scheduled_failure(self, sim: QrsSimulator) -> None:
        self.say("\n>>> A scheduled run fails: nobody asked for it over MQTT, the monitor saw it")
        assert sim.state is not None
        self.say("    (the simulator fires the schedule of Reload Web Shop now)")
        sim.state.fire(sim.state.tasks[WEB_SHOP])
        while True:
            event = await asyncio.wait_for(self.events.get(), 60)
            if event["taskId"] == WEB_SHOP:
                break
        self.say(
            f"    event butler/event/task/failed: {event['taskName']} {event['state']},"
            f" started by {event['startedBy']}; its reason, the script log's last lines:"
        )
        for reason_line in event["reason"].splitlines():
            self.say(f"        | {reason_line}")

    async def alerted_and_chained(self, receiver: Receiver) -> None:
        self.say("\n>>> The failure reached people, and its chain started the next task")
        alert = await asyncio.wait_for(receiver.got.get(), 60)
        self.say(f'    webhook ops (a receiver on {receiver.url}) got {{"text": ...}}:')
        self.say(f"        {alert['text'].splitlines()[0]}")
        self.say(f"    chain {DEMO_CHAIN['name']} (after a failure of Reload Web Shop):")
        for _ in range(2):
            self.show(await asyncio.wait_for(self.chained.get(), 60))

    async def request(
        self, title: str, topic: str, payload: dict[str, Any] | None = None, replies: int = 1
    ) -> None:
        self.say(f"\n>>> {title}")
        body = json.dumps(payload) if payload else ""
        self.say(f"    publish {topic} {body}".rstrip())
        reply_topic = f"demo/replies/{uuid.uuid4().hex[:8]}"
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.replies[reply_topic] = queue
        await self.peer.subscribe(reply_topic)
        await self.peer.publish(topic, body.encode(), response_topic=reply_topic)
        for _ in range(replies):
            self.show(await asyncio.wait_for(queue.get(), 60))

    def show(self, reply: dict[str, Any]) -> None:
        self.say(f"    reply ({reply['stage']}): status {reply['status']}")
        for task in reply.get("tasks", []):
            state = f" -> {task['state']}" if "state" in task else ""
            self.say(
                f"      {task['result']:<16}{task['taskName']}{state}"
                f"   matched by {', '.join(task['matchedBy'])}"
            )
        for task in reply.get("tasks", []):
            if task.get("error"):
                self.say(f"        ({task['taskName']}: {task['error']})")
        for missing in reply.get("unmatched", []):
            self.say(f"      {missing['reason']:<16}{missing['selector']}")
        if "error" in reply:
            self.say(f"      error {reply['error']['code']}: {reply['error']['message']}")


async def run_demo(
    out: TextIO, *, once: bool, port: int = DEFAULT_BROKER_PORT, cloud: bool = False
) -> int:
    """The tour; the broker listens on `port` when it is free (0: any free port). `cloud`:
    against the Qlik Cloud simulator instead of the QRS one."""
    folder = Path(tempfile.mkdtemp(prefix="mqtt-starter-demo-"))
    stop = asyncio.Event()
    signals = StopSignals(asyncio.get_running_loop(), stop.set)
    signals.install()
    try:
        async with _broker(folder, port) as got:
            wanted, port = port, got
            certs = ensure_certificates(folder / "certs")
            sim: QrsSimulator | CloudSimulator
            receiver = Receiver()
            mqtt = {"host": "127.0.0.1", "port": port, "client_id": "mqtt-starter-demo"}
            page_port = _free_port(DEFAULT_PAGE_PORT)
            http = {"enabled": True, "host": "127.0.0.1", "port": page_port}
            config: dict[str, Any]
            if cloud:
                sim = CloudSimulator(load_cloud_fixture(), certs, port=0)
                await sim.start()
                config = {
                    "mqtt": mqtt,
                    "http": http,
                    "cloud": {
                        "tenant_url": sim.url,
                        "api_key": sim.fixture.api_keys[0],
                        "ca_file": str(certs.root),
                        "poll_interval_s": 0.25,
                    },
                    "monitor": {"log_tail_lines": 4},
                }
                what = f"Qlik Cloud simulator {sim.url} with {len(sim.fixture.apps)} sample apps"
            else:
                sim = QrsSimulator(load_fixture(), certs, port=0)
                await sim.start()
                await receiver.start()
                config = {
                    "mqtt": mqtt,
                    "http": http,
                    "qrs": {
                        "url": sim.url,
                        "cert_file": str(certs.client),
                        "key_file": str(certs.client_key),
                        "ca_file": str(certs.root),
                        "poll_interval_s": 0.25,
                    },
                    "monitor": {"enabled": True, "interval_s": 0.5, "log_tail_lines": 6},
                    "alerts": {
                        "webhooks": [
                            {"name": "ops", "url": receiver.url, "format": "text",
                             "scope": {"task_ids": [WEB_SHOP]}}
                        ]
                    },
                    "chains": [DEMO_CHAIN],
                }  # fmt: skip
                what = f"QRS simulator {sim.url} with {len(sim.fixture.tasks)} sample tasks"
            try:
                async with _daemon(folder, config) as config_path:
                    print(
                        f"mqtt-starter demo: broker 127.0.0.1:{port}, {what}, daemon ready"
                        f"\n(files and logs in {folder})"
                        f"\nstatus page: http://127.0.0.1:{page_port}/ (watch the tour there)",
                        file=out,
                        flush=True,
                    )
                    if port != wanted and wanted == DEFAULT_BROKER_PORT:
                        print(
                            f"(port {DEFAULT_BROKER_PORT} is taken: the example Node-RED flow"
                            f" needs both its broker nodes set to port {port})",
                            file=out,
                            flush=True,
                        )
                    if isinstance(sim, CloudSimulator):
                        await _cloud_tour(port, out)
                    else:
                        await _tour(port, out, sim, receiver)
                    if not once:
                        _print_try(out, port, config_path)
                        await stop.wait()
            finally:
                await sim.stop()
                await receiver.stop()
    except DemoError as exc:
        print(f"mqtt-starter demo: {exc}", file=sys.stderr)
        return 1
    finally:
        signals.remove()
    shutil.rmtree(folder, ignore_errors=True)
    print("\ndemo finished: broker, simulator and daemon stopped", file=out)
    return 0


@contextlib.asynccontextmanager
async def _touring(port: int, out: TextIO) -> AsyncIterator[Tour]:
    """A tour that prints the status events (and failure events) as they come."""
    async with MqttPeer(
        MqttSettings(host="127.0.0.1", port=port), f"demo-tour-{uuid.uuid4().hex[:6]}"
    ) as peer:
        tour = Tour(peer, out)
        await peer.subscribe("butler/status/task/#")
        await peer.subscribe("butler/event/task/#")
        listener = asyncio.create_task(tour.listen(), name="demo-listen")
        try:
            yield tour
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


async def _tour(port: int, out: TextIO, sim: QrsSimulator, receiver: Receiver) -> None:
    async with _touring(port, out) as tour:
        await tour.peer.subscribe(f"butler/reply/chain/{DEMO_CHAIN['name']}")
        await tour.request("Start one task by id", f"butler/start/id/{SALES}")
        await tour.request(
            "Start every task tagged Nightly (Reload Sales is still running)",
            "butler/start/tag/Nightly",
        )
        await tour.request(
            "Start the tasks whose custom property taskGroup is tasks2",
            "butler/start/cp/taskGroup/tasks2",
            {"requestId": "demo-cp"},
        )
        await tour.request(
            "A JSON request that waits for the end: one task fails, one succeeds on retry",
            "butler/start",
            {"requestId": "demo-wait", "tags": ["Monthly", "Nightly-fragile"], "wait": True},
            replies=2,
        )
        await tour.scheduled_failure(sim)
        await tour.alerted_and_chained(receiver)
        await _dashboard(MqttSettings(host="127.0.0.1", port=port), tour)


async def _cloud_tour(port: int, out: TextIO) -> None:
    async with _touring(port, out) as tour:
        await tour.request("Reload one app by id", f"butler/start/id/{CLOUD_SALES}")
        await tour.request(
            "Reload every app tagged Nightly, in any space (Sales Dashboard is reloading)",
            "butler/start/tag/Nightly",
        )
        await tour.request(
            "Reload the apps of the space Sales",
            "butler/start/space/Sales",
            {"requestId": "demo-space"},
        )
        await tour.request(
            "Custom properties have no Qlik Cloud equivalent",
            "butler/start/cp/taskGroup/tasks1",
        )
        await tour.request(
            "A partial reload with a variable that waits for the end: one fails, one is refused",
            "butler/start",
            {
                "requestId": "demo-wait",
                "tags": ["Nightly-fragile"],
                "names": ["HR Headcount"],
                "partial": True,
                "variables": {"vSource": "mqtt"},
                "wait": True,
            },
            replies=2,
        )


async def _dashboard(settings: MqttSettings, tour: Tour) -> None:
    """What a dashboard that connects now gets at once: the retained state of each task."""
    tour.say("\n>>> A dashboard that connects now sees each task's last run at once (retained)")
    marker = f"demo/dashboard/{uuid.uuid4().hex[:8]}"
    states: dict[str, dict[str, Any]] = {}
    async with MqttPeer(settings, f"demo-dashboard-{uuid.uuid4().hex[:6]}") as peer:
        await peer.subscribe("butler/state/task/+")
        await peer.subscribe(marker)
        # Retained messages come before anything published after the subscription.
        await peer.publish(marker, b"end")
        async with asyncio.timeout(30):
            async for message in peer.messages():
                if message.topic == marker:
                    break
                if message.payload:
                    data = json.loads(message.payload)
                    states[data["taskName"]] = data
    for name in sorted(states):
        data = states[name]
        tour.say(f"      state  {name}: {data['state']} (started by {data['startedBy']})")


def _print_try(out: TextIO, port: int, config_path: Path) -> None:
    print(
        f"""
The demo keeps running. Try these in another terminal (Ctrl-C here stops everything):

  mosquitto_rr -h 127.0.0.1 -p {port} -V 5 -t butler/start/tag/startTask1 -e demo/try \\
      -m '{{"requestId": "try-1"}}'
  mosquitto_sub -h 127.0.0.1 -p {port} -t 'butler/status/#' -t 'butler/reply/#' -v
  mosquitto_sub -h 127.0.0.1 -p {port} -t 'butler/state/task/+' -t 'butler/event/#' -v
  mosquitto_pub -h 127.0.0.1 -p {port} -t butler/start -m '{{"names": ["Reload HR"]}}'
  mosquitto_pub -h 127.0.0.1 -p {port} -t 'butler/start/tag/Q1%2725' -m ''
  {sys.executable} -m mqtt_starter tasks -c {config_path} --tag Nightly
""",
        file=out,
        flush=True,
    )
