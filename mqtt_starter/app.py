"""The daemon: wires the broker link, the QRS client, the starter and the trackers.

One message's way: MqttLink → `_on_message` → triggers.interpret → Starter.handle → reply
published → (the link acks) → trackers follow started executions and publish status events,
and the `finished` reply when the request asked to wait.
SIGTERM/SIGINT: stop taking messages, finish those in flight (bounded), `offline`, exit 0.
SIGHUP: reload the configuration; the broker connection is rebuilt only when its settings or
the subscriptions changed (same client id: the session and its queued triggers survive).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from loguru import logger

from .codec import encode_reply, encode_status_event
from .config import Settings
from .errors import ConfigError, MqttLinkError, QrsError
from .logs import configure_logging
from .metrics import Metrics
from .model import Execution, Reply, ReplyStatus, Request, Selector, SelectorKind, TaskOutcome
from .mqtt_link import Incoming, MqttLink
from .policy import Debouncer
from .qrs_client import QrsClient
from .routing import Route, TopicFilter, When
from .starter import Answered, Handled, Starter, error_reply, finished_reply
from .systemd import Notifier
from .tracker import Tracker
from .triggers import Accept, Ignore, Refuse, TriggerRules, interpret, topic_kind

if TYPE_CHECKING:
    from .http_api import HttpApi

# Readiness asks QRS again when its last answer is older than this.
QRS_FRESH_S = 30.0


def build_routes(settings: Settings) -> tuple[Route, ...]:
    routes = []
    for r in settings.routes:
        selectors = (
            *(Selector(SelectorKind.ID, v) for v in r.task_ids),
            *(Selector(SelectorKind.TAG, v) for v in r.tags),
            *(
                Selector(SelectorKind.CUSTOM_PROPERTY, cp.value, cp.name)
                for cp in r.custom_properties
            ),
            *(Selector(SelectorKind.NAME, v) for v in r.names),
        )
        when = When(r.when.field, r.when.equals) if r.when else None
        routes.append(Route(TopicFilter.parse(r.topic), selectors, when, r.debounce_s))
    return tuple(routes)


def build_rules(settings: Settings) -> TriggerRules:
    return TriggerRules(
        base=settings.mqtt.base_topic,
        routes=build_routes(settings),
        reply_allow=tuple(TopicFilter.parse(f) for f in settings.mqtt.reply_topic_allow),
        accept_retained=settings.mqtt.accept_retained,
        max_payload_bytes=settings.policy.max_payload_bytes,
        max_tasks_per_request=settings.policy.max_tasks_per_request,
    )


def warn_about_settings(settings: Settings) -> None:
    if settings.policy.allow is None:
        logger.warning(
            "policy.allow is not set: every task may be started by anyone who can"
            " publish to {}/start",
            settings.mqtt.base_topic,
        )
    if settings.qrs.insecure:
        logger.warning("qrs.insecure is true: the QRS server certificate is NOT verified")
    elif not settings.qrs.verify_hostname:
        logger.info(
            "qrs.verify_hostname is false: the QRS certificate chain is verified against"
            " qrs.ca_file, its host name is not"
        )
    if settings.mqtt.tls.enabled and settings.mqtt.tls.insecure:
        logger.warning("mqtt.tls.insecure is true: the broker host name is NOT checked")


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        reload: Callable[[], Settings] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self._reload_settings = reload
        self.notifier = notifier or Notifier()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._debouncer = Debouncer()
        self._answered = Answered(settings.policy.dedupe_window_s)
        self.qrs: QrsClient | None = None
        self.link: MqttLink | None = None
        self._link_task: asyncio.Task[None] | None = None
        self.rules = build_rules(settings)
        self.starter: Starter | None = None
        self.tracker: Tracker | None = None
        self.qrs_ready = asyncio.Event()
        self.metrics = Metrics()
        self.http: HttpApi | None = None
        self._connected_once = False

    @property
    def instance(self) -> str:
        return self.settings.mqtt.client_id

    # -- lifecycle ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def _spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        warn_about_settings(self.settings)
        await self._start_qrs()
        self._start_link()
        await self._start_http()
        watchdog = asyncio.create_task(self.notifier.watchdog(), name="watchdog")
        ready = asyncio.create_task(self._announce_ready(), name="ready")
        try:
            while not self._stop.is_set():
                stop = asyncio.create_task(self._stop.wait())
                reload = asyncio.create_task(self._reload.wait())
                await asyncio.wait({stop, reload}, return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                reload.cancel()
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    await self._apply_reload()
        finally:
            self.notifier.stopping()
            logger.info("stopping: finishing requests in flight")
            await self._stop_link(offline=True)
            await self._stop_http()
            ready.cancel()
            watchdog.cancel()
            for task in list(self._background):
                task.cancel()
            await asyncio.gather(ready, watchdog, *self._background, return_exceptions=True)
            if self.qrs is not None:
                await self.qrs.close()
            logger.info("stopped")
        return 0

    async def _start_qrs(self) -> None:
        self.qrs = QrsClient(self.settings.qrs, observer=self.metrics.observe_qrs)
        await self.qrs.start()
        tracker = self.tracker = Tracker(self.qrs, self.settings.qrs.poll_interval_s)
        self.metrics.follow_executions(lambda: tracker.following)
        self.starter = Starter(self.qrs, self.settings.policy, answered=self._answered)
        self.qrs_ready.clear()
        self._spawn(self._probe_qrs(), "qrs-probe")

    async def _probe_qrs(self) -> None:
        assert self.qrs is not None
        while True:
            try:
                about = await self.qrs.about()
                logger.info(
                    "QRS {} answered (build {})",
                    self.settings.qrs.url,
                    about.get("buildVersion", "?"),
                )
                self.qrs_ready.set()
                return
            except QrsError as exc:
                logger.warning("QRS not ready: {}", exc)
                self.notifier.status(f"waiting for QRS: {exc}")
                await asyncio.sleep(self.settings.qrs.retry.max_backoff_s)

    def _start_link(self) -> None:
        s = self.settings.mqtt
        self.link = MqttLink(
            s,
            [f.text for f in self.rules.subscriptions],
            f"{s.base_topic}/availability/{s.client_id}",
            on_connect=self._on_connect,
            on_disconnect=self._on_disconnect,
        )
        self._link_task = asyncio.create_task(self.link.run(self._on_message), name="mqtt-link")

    def _on_connect(self) -> None:
        if self._connected_once:
            self.metrics.reconnects.inc()
        self._connected_once = True
        self.metrics.broker_connected.set(1)

    def _on_disconnect(self) -> None:
        self.metrics.broker_connected.set(0)

    async def not_ready(self) -> list[str]:
        """Why the daemon cannot serve now; empty when it can."""
        reasons = []
        if self.link is None or not self.link.connected.is_set():
            reasons.append(
                f"not connected to the broker {self.settings.mqtt.host}:{self.settings.mqtt.port}"
            )
        qrs = self.qrs
        if qrs is None:
            reasons.append("no QRS client")
        elif qrs.last_success is None or time.monotonic() - qrs.last_success > QRS_FRESH_S:
            try:
                await asyncio.wait_for(qrs.about(), self.settings.qrs.timeout_s)
            except (QrsError, TimeoutError) as exc:
                reasons.append(f"QRS does not answer: {exc}")
        return reasons

    async def _start_http(self) -> None:
        if not self.settings.http.enabled:
            return

        def current_starter() -> Starter:
            assert self.starter is not None
            return self.starter

        from .http_api import HttpApi  # aiohttp.web only when the endpoint is on

        self.http = HttpApi(self.settings.http, current_starter, self.metrics, self.not_ready)
        await self.http.start_serving()
        logger.info("HTTP endpoint on http://{}:{}", self.settings.http.host, self.http.port)

    async def _stop_http(self) -> None:
        if self.http is not None:
            await self.http.stop()
            self.http = None

    async def _stop_link(self, *, offline: bool) -> None:
        if self.link is None or self._link_task is None:
            return
        self.link.stop(offline=offline)
        await asyncio.gather(self._link_task, return_exceptions=True)

    async def _announce_ready(self) -> None:
        assert self.link is not None
        await self.qrs_ready.wait()
        await self.link.connected.wait()
        self.notifier.ready(
            f"serving {self.settings.mqtt.base_topic}/start on"
            f" {self.settings.mqtt.host}:{self.settings.mqtt.port}"
        )
        logger.info("ready")

    async def _apply_reload(self) -> None:
        if self._reload_settings is None:
            return
        self.notifier.reloading()
        try:
            new = self._reload_settings()
        except ConfigError as exc:
            for problem in exc.problems:
                logger.error("reload refused, keeping the running configuration: {}", problem)
            self.notifier.status("reload refused: invalid configuration")
            return
        old, self.settings = self.settings, new
        configure_logging(new.log)
        warn_about_settings(new)
        old_rules, self.rules = self.rules, build_rules(new)
        if new.qrs != old.qrs:
            for task in list(self._background):
                task.cancel()
            assert self.qrs is not None
            await self.qrs.close()
            await self._start_qrs()
        else:
            assert self.qrs is not None
            self.starter = Starter(self.qrs, new.policy, answered=self._answered)
        if new.mqtt != old.mqtt or old_rules.subscriptions != self.rules.subscriptions:
            await self._stop_link(offline=False)
            self._start_link()
        if new.http != old.http:
            await self._stop_http()
            await self._start_http()
        logger.info("configuration reloaded")
        self.notifier.ready("configuration reloaded")

    # -- one message ---------------------------------------------------------------------------

    async def _publish(
        self, topic: str, payload: bytes, correlation_data: bytes | None = None
    ) -> None:
        if self.link is None:
            raise MqttLinkError("no broker link")
        await self.link.publish(topic, payload, correlation_data=correlation_data)

    async def _reply(self, topic: str | None, reply: Reply, incoming: Incoming) -> None:
        if topic is None:
            logger.warning(
                "no reply for {}: its default reply topic would trigger a route", incoming.topic
            )
            return
        await self._publish(topic, encode_reply(reply, self.instance), incoming.correlation_data)

    async def _on_message(self, incoming: Incoming) -> None:
        started = time.monotonic()
        decision = interpret(
            self.rules,
            incoming.topic,
            incoming.payload,
            retain=incoming.retain,
            response_topic=incoming.response_topic,
        )
        kind = topic_kind(self.rules, incoming.topic)
        if isinstance(decision, Ignore):
            self.metrics.triggers.labels(kind, "ignored").inc()
            logger.info("ignored {}: {}", incoming.topic, decision.reason)
            return
        if isinstance(decision, Refuse):
            reply = error_reply(decision.request_id, decision.error.code, str(decision.error))
            self.metrics.count_reply(kind, reply)
            await self._reply(decision.reply_topic, reply, incoming)
            logger.info(
                "refused {} requestId={}: {} ({})",
                incoming.topic,
                decision.request_id,
                decision.error.code,
                decision.error,
            )
            return
        try:
            handled = await self._accept(decision)
        except Exception:
            # A bug must not leave the sender without an answer, nor loop: the message is
            # answered, logged with its traceback, and acknowledged like any other.
            logger.exception("request on {} failed", incoming.topic)
            handled = Handled(
                error_reply(
                    decision.request.request_id,
                    "internal",
                    "internal error; the daemon's log has the details",
                )
            )
        self.metrics.count_reply(kind, handled.reply)
        await self._reply(decision.reply_topic, handled.reply, incoming)
        self._log_outcome(incoming.topic, handled, started)
        self._follow(decision, handled, incoming)

    async def _accept(self, decision: Accept) -> Handled:
        assert self.starter is not None
        request = decision.request
        if decision.debounce_key is not None and not self._debouncer.admit(
            decision.debounce_key, decision.debounce_s, time.monotonic()
        ):
            return Handled(
                Reply(
                    ReplyStatus.OK,
                    request_id=request.request_id,
                    notes=(f"debounced: started less than {decision.debounce_s}s ago",),
                )
            )
        return await self.starter.handle(request)

    def _log_outcome(self, topic: str, handled: Handled, started: float) -> None:
        reply = handled.reply
        counts: dict[str, int] = {}
        for outcome in reply.outcomes:
            counts[outcome.result.value] = counts.get(outcome.result.value, 0) + 1
        detail = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
        if reply.error is not None:
            detail = f"{reply.error.code}: {reply.error.message}"
        logger.info(
            "request {} requestId={} -> {}{} {} unmatched={} in {:.0f} ms",
            topic,
            reply.request_id,
            reply.status.value,
            " (replayed)" if handled.replayed else "",
            detail,
            len(reply.unmatched),
            (time.monotonic() - started) * 1000,
        )

    def _follow(self, decision: Accept, handled: Handled, incoming: Incoming) -> None:
        request = decision.request
        wants_events = self.settings.status.publish_task_events
        if handled.replayed or not (request.wait or (wants_events and handled.started)):
            return
        if handled.reply.error is not None:
            return
        self._spawn(
            self._follow_request(request, handled, decision.reply_topic, incoming),
            f"follow-{request.request_id or incoming.topic}",
        )

    async def _follow_request(
        self, request: Request, handled: Handled, reply_topic: str | None, incoming: Incoming
    ) -> None:
        tracker = self.tracker
        assert tracker is not None
        timeout_s = request.wait_timeout_s or self.settings.status.wait_timeout_s
        finals = await asyncio.gather(
            *(self._follow_one(tracker, o, request.request_id, timeout_s) for o in handled.started)
        )
        if request.wait:
            reply = finished_reply(handled.reply, {o.task.id: o for o in finals})
            try:
                await self._reply(reply_topic, reply, incoming)
            except MqttLinkError as exc:
                logger.warning(
                    "the finished reply for requestId={} was lost: {}", request.request_id, exc
                )

    async def _follow_one(
        self, tracker: Tracker, outcome: TaskOutcome, request_id: str | None, timeout_s: float
    ) -> TaskOutcome:
        assert outcome.execution_id is not None
        topic = f"{self.settings.mqtt.base_topic}/status/task/{outcome.task.id}"

        async def on_change(execution: Execution) -> None:
            if not self.settings.status.publish_task_events:
                return
            with contextlib.suppress(MqttLinkError):
                await self._publish(
                    topic, encode_status_event(execution, outcome.task.name, request_id)
                )

        final = await tracker.follow(
            outcome.task, outcome.execution_id, on_change, timeout_s=timeout_s
        )
        return dataclasses.replace(outcome, final=final)
