"""Webhook alerts, decided without I/O (DESIGN.md section 10): which event a run that ended
makes, the body each format sends, its signature, and what a receiver's answer means.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from email.utils import parsedate_to_datetime
from typing import Any

from mqtt_starter.core.model import TaskStatus

ALERT_KINDS = {
    TaskStatus.FINISHED_FAIL: "failed",
    TaskStatus.ERROR: "failed",
    TaskStatus.ABORTED: "aborted",
    TaskStatus.FINISHED_SUCCESS: "succeeded",
}
SIGNATURE_HEADER = "X-Mqtt-Starter-Signature"
EVENT_HEADER = "X-Mqtt-Starter-Event"
DELIVERY_HEADER = "X-Mqtt-Starter-Delivery"
# A summary line longer than this is cut: chat tools fold or refuse long messages.
TEXT_MAX_CHARS = 3000
# Of the reason, the text format sends the last lines: the error and how the run ended.
TEXT_REASON_LINES = 8


def alert_kind(status: TaskStatus) -> str | None:
    """`failed`, `aborted` or `succeeded` for a run that ended so; None for any other state."""
    return ALERT_KINDS.get(status)


def body(kind: str, event: dict[str, Any], fmt: str, held_back: int = 0) -> bytes:
    """What is POSTed: the event as published on MQTT (`json`, with `event` and, when alerts
    of the task were held back by its interval, `heldBack`), or `{"text": ...}` (`text`)."""
    if fmt == "text":
        return json.dumps({"text": summary(kind, event, held_back)}, ensure_ascii=False).encode()
    document = {"event": kind, **event}
    if held_back:
        document["heldBack"] = held_back
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def summary(kind: str, event: dict[str, Any], held_back: int = 0) -> str:
    """One line for people, then the reason's last lines (the end of the script log, where
    Sense writes the error): what Slack or Mattermost shows."""
    name = event.get("taskName") or event.get("taskId") or "a task"
    line = f"Qlik Sense task {name} {kind}"
    state = event.get("state")
    if state:
        line += f" ({state})"
    duration = event.get("durationMs")
    if isinstance(duration, int | float) and duration > 0:
        line += f" after {duration / 1000:.1f} s"
    if held_back:
        line += f"; {held_back} earlier alert(s) of this task held back"
    reason = [r for r in str(event.get("reason") or "").splitlines() if r.strip()]
    if reason:
        line += "\n" + "\n".join(reason[-TEXT_REASON_LINES:])
    return line[:TEXT_MAX_CHARS]


def signature(secret: str, payload: bytes) -> str:
    """The `X-Mqtt-Starter-Signature` value: `sha256=` and the HMAC-SHA256 of the body, in hex."""
    return "sha256=" + hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


class Answer(enum.Enum):
    """What a receiver's answer means for a delivery."""

    DELIVERED = "delivered"
    RETRY = "retry"
    GIVE_UP = "give_up"


def judge(status: int) -> Answer:
    """2xx: delivered; 408, 429 and 5xx: tried again; any other answer: given up at once."""
    if 200 <= status < 300:
        return Answer.DELIVERED
    if status in (408, 429) or status >= 500:
        return Answer.RETRY
    return Answer.GIVE_UP


def retry_after_s(value: str | None, now: float) -> float | None:
    """A `Retry-After` header in seconds (delta or HTTP date; `now`: Unix time); None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return float(max(0.0, moment.timestamp() - now))


def backoff_s(attempt: int, first_s: float, max_s: float, retry_after: float | None) -> float:
    """The wait before try `attempt + 1` (`attempt` >= 1): doubling from `first_s`, at most
    `max_s`; a receiver's `Retry-After` is honoured, also when longer (up to `max_s`)."""
    doubled = min(max_s, first_s * 2.0 ** (attempt - 1))
    if retry_after is not None:
        return min(max_s, max(doubled, retry_after))
    return doubled
