"""`mqtt-starter trigger`: the client for schedulers and scripts (SQL Agent, Control-M, Windows
Task Scheduler, cron, an Airflow or ETL shell step), DESIGN.md section 5.

It needs only the broker, never Sense credentials: it publishes one request on `<base>/start`
with a fresh `requestId` and a private response topic (the MQTT 5 Response Topic; `replyTo` on
3.1.1), prints what each task got, and with `--wait` follows to the finished reply. Its exit
code says how it went, so that a scheduler can act on it:

    0  everything asked for started (with --wait: every run ended FinishedSuccess)
    1  with --wait, a run did not succeed (failed, aborted, skipped, unknown)
    2  nothing or not everything started (denied, disabled, already running, unmatched, refused)
    3  with --wait, the wait timed out
    4  no answer (the broker cannot be reached, or no daemon answered in --reply-timeout)
    78 bad configuration or arguments
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from mqtt_starter.config import MqttSettings
from mqtt_starter.core.errors import MqttLinkError
from mqtt_starter.mqtt.link import MqttPeer

OK, RUN_FAILED, NOT_STARTED, TIMED_OUT, NO_ANSWER = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class Ask:
    """What to ask the daemon for."""

    task_ids: Sequence[str] = ()
    tags: Sequence[str] = ()
    custom_properties: Sequence[tuple[str, str]] = ()
    names: Sequence[str] = ()
    spaces: Sequence[str] = ()
    wait: bool = False
    timeout_s: float | None = None
    dry_run: bool = False

    def empty(self) -> bool:
        return not (
            self.task_ids or self.tags or self.custom_properties or self.names or self.spaces
        )

    def payload(self, request_id: str, reply_to: str | None) -> dict[str, Any]:
        data: dict[str, Any] = {"requestId": request_id}
        if reply_to is not None:
            data["replyTo"] = reply_to
        for key, values in (
            ("taskIds", self.task_ids),
            ("tags", self.tags),
            ("names", self.names),
            ("spaces", self.spaces),
        ):
            if values:
                data[key] = list(values)
        if self.custom_properties:
            data["customProperties"] = [{"name": n, "value": v} for n, v in self.custom_properties]
        if self.wait:
            data["wait"] = True
            if self.timeout_s is not None:
                data["waitTimeoutS"] = self.timeout_s
        if self.dry_run:
            data["dryRun"] = True
        return data


def accepted_code(reply: dict[str, Any]) -> int:
    """The exit code an accepted reply alone gives: 0 when everything asked for started."""
    return OK if reply.get("status") == "ok" else NOT_STARTED


def finished_code(reply: dict[str, Any]) -> int:
    """The exit code of a finished reply: 0 every run succeeded, 3 a run timed out, else 1."""
    tasks = [t for t in reply.get("tasks", []) if isinstance(t, dict)]
    if any(t.get("timedOut") for t in tasks):
        return TIMED_OUT
    return OK if reply.get("status") == "ok" else RUN_FAILED


def table(reply: dict[str, Any]) -> list[str]:
    """A reply for people: one line a task, and the selectors that matched nothing."""
    if "error" in reply:
        error = reply["error"]
        return [f"refused: {error.get('code')}: {error.get('message')}"]
    lines = [f"{reply.get('stage')}: {reply.get('status')}"]
    finished = reply.get("stage") == "finished"
    for task in reply.get("tasks", []):
        # At the end a started task shows how its run ended; before, what the start got.
        shown = task.get("state", task.get("result", "?")) if finished else task.get("result")
        timed = " (timed out)" if task.get("timedOut") else ""
        why = task.get("reason") or task.get("error")
        lines.append(
            f"  {shown:<17} {task.get('taskName', '')} ({task.get('taskId', '')}){timed}"
            + (f": {why.splitlines()[-1]}" if why else "")
        )
    lines += [
        f"  {'unmatched':<17} {u.get('selector')}: {u.get('reason')}"
        for u in reply.get("unmatched", [])
    ]
    return lines


async def trigger(
    settings: MqttSettings,
    ask: Ask,
    *,
    reply_timeout_s: float = 30.0,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Publish the request, print the replies, and say how it went (the exit code); `out`
    and `err` default to the standard streams as they are when it runs."""
    out = out or sys.stdout
    err = err or sys.stderr
    request_id = f"trigger-{uuid.uuid4()}"
    base = settings.base_topic
    reply_topic = f"{base}/reply/trigger/{uuid.uuid4().hex}"
    v5 = settings.protocol == "5"
    payload = ask.payload(request_id, None if v5 else reply_topic)

    def show(reply: dict[str, Any]) -> None:
        if as_json:
            print(json.dumps(reply, ensure_ascii=False), file=out, flush=True)
        else:
            print("\n".join(table(reply)), file=out, flush=True)

    try:
        async with MqttPeer(settings, f"mqtt-starter-trigger-{uuid.uuid4().hex[:12]}") as peer:
            await peer.subscribe(reply_topic)
            await peer.publish(
                f"{base}/start",
                json.dumps(payload).encode(),
                response_topic=reply_topic if v5 else None,
            )
            replies = _replies(peer, request_id)
            accepted = await _next(replies, reply_timeout_s)
            if accepted is None:
                print(
                    f"mqtt-starter trigger: no daemon answered on {base}/start within"
                    f" {reply_timeout_s:g} s (broker {settings.host}:{settings.port})",
                    file=err,
                )
                return NO_ANSWER
            show(accepted)
            code = accepted_code(accepted)
            started = [t for t in accepted.get("tasks", []) if t.get("result") == "started"]
            if not (ask.wait and started and "error" not in accepted):
                return code
            # The daemon sends the finished reply by the wait's end at the latest.
            limit = (ask.timeout_s or 86_400.0) + reply_timeout_s
            finished = await _next(replies, limit)
            if finished is None:
                print("mqtt-starter trigger: the finished reply did not come in time", file=err)
                return TIMED_OUT
            show(finished)
            return code if code != OK else finished_code(finished)
    except MqttLinkError as exc:
        print(
            f"mqtt-starter trigger: the broker {settings.host}:{settings.port} cannot be"
            f" reached: {exc}",
            file=err,
        )
        return NO_ANSWER


async def _replies(peer: MqttPeer, request_id: str) -> Any:
    """The replies to this request, as they come (others on the topic are passed over)."""
    async for message in peer.messages():
        try:
            reply = json.loads(message.payload)
        except ValueError:
            continue
        if isinstance(reply, dict) and reply.get("requestId") == request_id:
            yield reply


async def _next(replies: Any, timeout_s: float) -> dict[str, Any] | None:
    try:
        reply: dict[str, Any] = await asyncio.wait_for(anext(replies), timeout_s)
    except (TimeoutError, StopAsyncIteration):
        return None
    return reply
