"""Webhook alerts (DESIGN.md section 10): each run end of the chosen kinds POSTed once to each
webhook, with retries, out of the monitor's way.

Every webhook has its own lane: a bounded queue and one worker. The monitor only appends to a
queue (never awaits a receiver), so a receiver that is down or hangs delays neither MQTT, nor the
monitor, nor the other webhooks; its queue drops its oldest delivery when full. Deliveries wait
in memory only: those still queued at a stop are dropped and logged, like the publications held
for the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from loguru import logger

from mqtt_starter.config import Settings, WebhookSettings
from mqtt_starter.core.alerts import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    Answer,
    backoff_s,
    body,
    judge,
    retry_after_s,
    signature,
)
from mqtt_starter.core.model import TaskRef
from mqtt_starter.core.policy import AllowList
from mqtt_starter.ops.metrics import Metrics

# Of a receiver's refusal, this much is logged: enough to see why, never a whole page.
ANSWER_LOGGED_CHARS = 300


@dataclass
class Delivery:
    """One event for one webhook; `id` stays the same across its tries."""

    kind: str
    task_id: str
    event: dict[str, Any]
    held_back: int = 0
    id: str = field(default_factory=lambda: str(uuid.uuid4()))


class Lane:
    """One webhook's queue and worker."""

    def __init__(
        self,
        settings: WebhookSettings,
        session: Callable[[], aiohttp.ClientSession],
        metrics: Metrics | None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._on_change = on_change
        # What the status page shows of this webhook (no URL: it is a secret).
        self.counts = {"delivered": 0, "failed": 0, "dropped": 0}
        self.last_failure = ""
        self._session = session
        self._metrics = metrics
        self._queue: deque[Delivery] = deque()
        self._wake = asyncio.Event()
        self._last_sent: dict[str, float] = {}  # task id → when its last alert was queued
        self._held: dict[str, int] = {}  # task id → alerts held back by the interval since
        self._worker: asyncio.Task[None] | None = None
        self._sending: Delivery | None = None  # the delivery being tried now

    @property
    def name(self) -> str:
        return self.settings.name

    def offer(self, kind: str, task: TaskRef, event: dict[str, Any]) -> None:
        """Queue the event if this webhook wants it; never waits."""
        hook = self.settings
        if kind not in hook.events:
            return
        if hook.scope is not None and not AllowList.build(
            hook.scope.task_ids,
            hook.scope.tags,
            [(cp.name, cp.value) for cp in hook.scope.custom_properties],
        ).allows(task):
            return
        now = self._clock()
        last = self._last_sent.get(task.id)
        if hook.per_task_interval_s and last is not None and now - last < hook.per_task_interval_s:
            self._held[task.id] = self._held.get(task.id, 0) + 1
            logger.debug(
                "webhook {}: alert of task {} held back by its interval", self.name, task.id
            )
            return
        self._last_sent[task.id] = now
        delivery = Delivery(kind, task.id, event, self._held.pop(task.id, 0))
        if len(self._queue) >= hook.queue_max:
            dropped = self._queue.popleft()
            self._count("dropped")
            logger.warning(
                "webhook {}: queue full ({}), dropped the oldest delivery {} (task {} {})",
                self.name,
                hook.queue_max,
                dropped.id,
                dropped.task_id,
                dropped.kind,
            )
        self._queue.append(delivery)
        self._wake.set()
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(
                self._run(), name=f"webhook {self.name}"
            )

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def close(self) -> None:
        # The delivery being tried at the stop (its receiver slow or down) counts as not sent.
        left = len(self._queue) + (self._sending is not None)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        if left:
            logger.warning("webhook {}: {} deliveries not sent at the stop", self.name, left)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            while self._queue:
                delivery = self._sending = self._queue.popleft()
                try:
                    await self._deliver(delivery)
                except Exception:
                    # One delivery must never stop the lane.
                    logger.exception(
                        "webhook {}: delivery {} (task {}) failed",
                        self.name,
                        delivery.id,
                        delivery.task_id,
                    )
                    self._count("failed")
                finally:
                    self._sending = None
            self._wake.clear()

    async def _deliver(self, delivery: Delivery) -> None:
        hook = self.settings
        payload = body(delivery.kind, delivery.event, hook.format, delivery.held_back)
        headers = {
            **hook.headers,
            "Content-Type": "application/json",
            EVENT_HEADER: delivery.kind,
            DELIVERY_HEADER: delivery.id,
        }
        if hook.secret is not None:
            headers[SIGNATURE_HEADER] = signature(hook.secret.get_secret_value(), payload)
        timeout = aiohttp.ClientTimeout(total=hook.timeout_s)
        for attempt in range(1, hook.retry.attempts + 1):
            status, retry_after, said = await self._post(payload, headers, timeout)
            answer = Answer.RETRY if status is None else judge(status)
            if answer is Answer.DELIVERED:
                self._count("delivered")
                logger.debug("webhook {}: delivered {} ({})", self.name, delivery.id, status)
                return
            if answer is Answer.GIVE_UP:
                self.last_failure = f"HTTP {status}: {said}"[:200]
                self._count("failed")
                logger.error(
                    "webhook {}: delivery {} (task {} {}) refused with HTTP {}: {}; given up",
                    self.name,
                    delivery.id,
                    delivery.task_id,
                    delivery.kind,
                    status,
                    said,
                )
                return
            if attempt == hook.retry.attempts:
                break
            wait = backoff_s(
                attempt,
                hook.retry.backoff_s,
                hook.retry.max_backoff_s,
                retry_after_s(retry_after, time.time()),
            )
            self._count("retried")
            logger.warning(
                "webhook {}: delivery {} (task {}) {}; try {} of {} in {:.1f} s",
                self.name,
                delivery.id,
                delivery.task_id,
                said if status is None else f"HTTP {status}",
                attempt + 1,
                hook.retry.attempts,
                wait,
            )
            await asyncio.sleep(wait)
        self.last_failure = f"not delivered after {hook.retry.attempts} tries"
        self._count("failed")
        logger.error(
            "webhook {}: delivery {} (task {} {}) not delivered after {} tries",
            self.name,
            delivery.id,
            delivery.task_id,
            delivery.kind,
            hook.retry.attempts,
        )

    async def _post(
        self, payload: bytes, headers: dict[str, str], timeout: aiohttp.ClientTimeout
    ) -> tuple[int | None, str | None, str]:
        """(status, Retry-After, what was said); status None when no answer came."""
        url = self.settings.url.get_secret_value()
        try:
            async with self._session().post(
                url, data=payload, headers=headers, timeout=timeout, allow_redirects=False
            ) as response:
                text = (await response.content.read(ANSWER_LOGGED_CHARS)).decode("utf-8", "replace")
                return response.status, response.headers.get("Retry-After"), text.strip()
        except TimeoutError:
            return None, None, f"no answer within {self.settings.timeout_s:g} s"
        except aiohttp.ClientError as exc:
            # The exception's text may carry the URL (a secret): only its kind is said.
            return None, None, f"cannot be reached ({type(exc).__name__})"

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.webhook_delivery(self.name, outcome)
        if outcome in self.counts:
            self.counts[outcome] += 1
            if self._on_change is not None:
                self._on_change()

    def summary(self) -> dict[str, Any]:
        """This webhook on the status page."""
        return {"name": self.name, **self.counts, "waiting": self.waiting,
                "lastFailure": self.last_failure}  # fmt: skip


class Webhooks:
    """The webhooks of the current settings; told of each run end by the monitor."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        """`clock`: for the per-task interval (monotonic seconds). `on_change`: told each
        webhook's counts when a delivery ends (the status page)."""
        self._settings = settings
        self._clock = clock
        self._on_change = on_change
        self._metrics = metrics
        self._lanes: dict[str, Lane] = {}
        self._client: aiohttp.ClientSession | None = None

    def run_ended(self, kind: str, task: TaskRef, event: dict[str, Any]) -> None:
        """Queue the event for each webhook that wants it."""
        for hook in self._settings().alerts.webhooks:
            try:
                lane = self._lanes.get(hook.name)
                if lane is None:
                    lane = self._lanes[hook.name] = Lane(
                        hook, self._session, self._metrics, self._clock, self._changed
                    )
                lane.settings = hook  # a reload's settings apply to the next deliveries
                lane.offer(kind, task, event)
            except Exception:
                logger.exception(
                    "webhook {}: the alert of task {} was not queued", hook.name, task.id
                )

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change([lane.summary() for lane in self._lanes.values()])

    def lanes(self) -> dict[str, Lane]:
        return dict(self._lanes)

    async def close(self) -> None:
        for lane in self._lanes.values():
            await lane.close()
        if self._client is not None:
            await self._client.close()

    def _session(self) -> aiohttp.ClientSession:
        if self._client is None or self._client.closed:
            # One pool for every webhook; cookies are not kept between deliveries.
            self._client = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self._client
