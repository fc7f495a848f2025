"""The floor: the least a trigger-to-start bridge can do, written directly on paho and aiohttp.

Receives a trigger on `butler/start/id/<id>` or `butler/start/tag/<tag>`, makes the same QRS
calls as the daemon (resolve the selector, then start each task, at most MAX_CONCURRENCY calls
at once), and publishes a reply to the MQTT 5 response topic with the correlation data.
No validation, policy, dedupe, tracking or logging: the cost of those is what the benchmark
shows as the daemon's ratio to this floor.

    python -m benchmarks.floor HOST PORT QRS_URL CERT_DIR MAX_CONCURRENCY
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import ssl
import string
import sys
from typing import Any
from urllib.parse import quote

import aiohttp
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ALPHABET = string.ascii_letters + string.digits


async def main(host: str, port: int, qrs_url: str, cert_dir: str, concurrency: int) -> None:
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context(cafile=f"{cert_dir}/root.pem")
    context.load_cert_chain(f"{cert_dir}/client.pem", f"{cert_dir}/client_key.pem")
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context, limit=concurrency),
        headers={"X-Qlik-User": "UserDirectory=INTERNAL; UserId=sa_repository"},
    )
    gate = asyncio.Semaphore(concurrency)

    async def qrs(method: str, path: str, query: str = "") -> Any:
        key = "".join(secrets.choice(ALPHABET) for _ in range(16))
        url = f"{qrs_url}/qrs/{path}?{query + '&' if query else ''}xrfkey={key}"
        async with gate, session.request(method, url, headers={"X-Qlik-Xrfkey": key}) as r:
            return await r.json()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="floor", protocol=mqtt.MQTTv5)

    async def start(task: dict[str, Any]) -> dict[str, Any]:
        answer = await qrs("POST", f"task/{task['id']}/start/synchronous")
        return {"taskId": task["id"], "executionId": answer["value"]}

    async def handle(message: mqtt.MQTTMessage) -> None:
        _, _, kind, value = message.topic.split("/", 3)
        condition = f"id eq {value}" if kind == "id" else f"tags.name eq '{value}'"
        tasks = await qrs("GET", "task/full", "filter=" + quote(condition, safe=""))
        started = await asyncio.gather(*(start(task) for task in tasks))
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = message.properties.CorrelationData
        client.publish(
            message.properties.ResponseTopic,
            json.dumps({"status": "ok", "tasks": started}),
            qos=1,
            properties=props,
        )

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        loop.call_soon_threadsafe(lambda: loop.create_task(handle(message)))

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, _rc: Any, _p: Any) -> None:
        sock = c.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.subscribe("butler/start/#", qos=1)

    subscribed = asyncio.Event()

    def on_subscribe(*_: Any) -> None:
        loop.call_soon_threadsafe(subscribed.set)

    client.on_message = on_message
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.connect(host, port)
    client.loop_start()
    # Ready once subscribed: a trigger published before would be lost (clean session), and the
    # load generator would wait for its reply in vain.
    await subscribed.wait()
    print("READY", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        client.loop_stop()
        await session.close()


if __name__ == "__main__":
    host, port, url, certs, concurrency = sys.argv[1:6]
    asyncio.run(main(host, int(port), url, certs, int(concurrency)))
