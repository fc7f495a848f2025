"""Prometheus metrics, on a registry of their own (no process-wide globals)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mqtt_starter.core.model import Reply

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The Prometheus series of the daemon, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.triggers = Counter(
            "mqtt_starter_triggers",
            "Requests received, by topic kind"
            " (id, tag, cp, name, payload, route, http) and outcome"
            " (accepted, refused, ignored)",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.tasks = Counter(
            "mqtt_starter_tasks", "Tasks in replies, by result", ["result"], registry=self.registry
        )
        self.qrs_seconds = Histogram(
            "mqtt_starter_qrs_request_seconds",
            "QRS call latency, by operation and HTTP status",
            ["operation", "status"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.reconnects = Counter(
            "mqtt_starter_broker_reconnects",
            "Reconnects to the broker after a lost or failed connection",
            registry=self.registry,
        )
        self.executions = Gauge(
            "mqtt_starter_executions_in_flight",
            "Executions being followed to their end",
            registry=self.registry,
        )
        # Label lookups take a lock and build tuples; on the request path the children are
        # looked up once and kept.
        self._qrs_children: dict[tuple[str, int], Histogram] = {}
        self._trigger_children: dict[tuple[str, str], Counter] = {}
        self._task_children: dict[str, Counter] = {}
        self.broker_connected = Gauge(
            "mqtt_starter_broker_connected",
            "1 while connected to the broker",
            registry=self.registry,
        )
        # Per task, for every task the monitor has seen (DESIGN.md section 10).
        labels = ["task_id", "task_name"]
        self.task_last_state = Gauge(
            "mqtt_starter_task_last_state",
            "The state code of the task's last run as the monitor saw it",
            labels,
            registry=self.registry,
        )
        self.task_last_duration = Gauge(
            "mqtt_starter_task_last_run_duration_seconds",
            "How long the task's last finished run took",
            labels,
            registry=self.registry,
        )
        self.task_last_success = Gauge(
            "mqtt_starter_task_last_success_timestamp_seconds",
            "When the task's last successful run ended (Unix time)",
            labels,
            registry=self.registry,
        )
        self.task_runs = Counter(
            "mqtt_starter_task_runs",
            "Finished runs of the task, by outcome (success, failure, aborted, other)",
            [*labels, "outcome"],
            registry=self.registry,
        )
        self.webhook_deliveries = Counter(
            "mqtt_starter_webhook_deliveries",
            "Webhook deliveries by outcome (delivered, retried, failed, dropped)",
            ["webhook", "outcome"],
            registry=self.registry,
        )
        self._task_names: dict[str, str] = {}  # task id → the name its series carry

    def observe_qrs(self, operation: str, seconds: float, status: int) -> None:
        key = (operation, status)
        child = self._qrs_children.get(key)
        if child is None:
            child = self._qrs_children[key] = self.qrs_seconds.labels(operation, str(status))
        child.observe(seconds)

    def count_reply(self, kind: str, reply: Reply) -> None:
        key = (kind, "refused" if reply.error else "accepted")
        child = self._trigger_children.get(key)
        if child is None:
            child = self._trigger_children[key] = self.triggers.labels(*key)
        child.inc()
        for outcome in reply.outcomes:
            result = outcome.result  # a StrEnum: the label is its value
            task_child = self._task_children.get(result)
            if task_child is None:
                task_child = self._task_children[result] = self.tasks.labels(result)
            task_child.inc()

    def task_run(
        self,
        task_id: str,
        task_name: str,
        state_code: int,
        *,
        ended: str | None = None,
        duration_s: float | None = None,
        ended_at: float | None = None,
    ) -> None:
        """A change of the task's run: its state; at its end (`ended`: the outcome), its
        duration, and when it succeeded. A renamed task's series move to the new name."""
        if self._task_names.get(task_id, task_name) != task_name:
            self.forget_task(task_id)
        self._task_names[task_id] = task_name
        self.task_last_state.labels(task_id, task_name).set(state_code)
        if ended is None:
            return
        self.task_runs.labels(task_id, task_name, ended).inc()
        if duration_s is not None:
            self.task_last_duration.labels(task_id, task_name).set(duration_s)
        if ended == "success" and ended_at is not None:
            self.task_last_success.labels(task_id, task_name).set(ended_at)

    def forget_task(self, task_id: str) -> None:
        """A deleted task's series go away."""
        name = self._task_names.pop(task_id, None)
        if name is None:
            return
        for family in (self.task_last_state, self.task_last_duration, self.task_last_success):
            with contextlib.suppress(KeyError):
                family.remove(task_id, name)
        for outcome in ("success", "failure", "aborted", "other"):
            with contextlib.suppress(KeyError):
                self.task_runs.remove(task_id, name, outcome)

    def webhook_delivery(self, webhook: str, outcome: str) -> None:
        """A delivery's step: `delivered`, `retried` (once per retry), `failed`, `dropped`."""
        self.webhook_deliveries.labels(webhook, outcome).inc()

    def follow_executions(self, count: Callable[[], float]) -> None:
        self.executions.set_function(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
