"""The webhook decisions without I/O: answers, waits, bodies and signatures."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from mqtt_starter.core.alerts import (
    Answer,
    alert_kind,
    backoff_s,
    body,
    judge,
    retry_after_s,
    signature,
    summary,
)
from mqtt_starter.core.model import TaskStatus

EVENT = {"taskId": "t-1", "taskName": "Reload HR", "state": "FinishedFail", "durationMs": 12_300,
         "reason": "line 1\n\nError: Field 'X' not found\nExecution finished.\n"}  # fmt: skip


@pytest.mark.parametrize(
    ("status", "answer"),
    [(200, Answer.DELIVERED), (204, Answer.DELIVERED), (408, Answer.RETRY), (429, Answer.RETRY),
     (500, Answer.RETRY), (503, Answer.RETRY), (301, Answer.GIVE_UP), (400, Answer.GIVE_UP),
     (401, Answer.GIVE_UP), (404, Answer.GIVE_UP), (410, Answer.GIVE_UP)],
)  # fmt: skip
def test_each_answer_is_judged(status: int, answer: Answer) -> None:
    assert judge(status) is answer


def test_waits_double_up_to_the_limit_and_honour_retry_after() -> None:
    assert [backoff_s(a, 1, 300, None) for a in (1, 2, 3, 10)] == [1, 2, 4, 300]
    assert backoff_s(1, 1, 300, 30) == 30
    assert backoff_s(1, 1, 20, 3600) == 20
    now = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    later = format_datetime(datetime(2026, 12, 3, 12, 0, 45, tzinfo=UTC), usegmt=True)
    assert retry_after_s(later, now.timestamp()) == 45.0
    assert (retry_after_s("7", 0), retry_after_s(None, 0), retry_after_s("soon", 0)) == (
        7.0,
        None,
        None,
    )


def test_kinds_bodies_and_signature() -> None:
    assert [alert_kind(s) for s in (TaskStatus.FINISHED_FAIL, TaskStatus.ERROR, TaskStatus.ABORTED,
            TaskStatus.FINISHED_SUCCESS, TaskStatus.SKIPPED)] == [
        "failed", "failed", "aborted", "succeeded", None]  # fmt: skip
    sent = body("failed", EVENT, "json", held_back=2)
    assert json.loads(sent) == {"event": "failed", **EVENT, "heldBack": 2}
    assert json.loads(body("failed", EVENT, "text")) == {
        "text": "Qlik Sense task Reload HR failed (FinishedFail) after 12.3 s\n"
        "line 1\nError: Field 'X' not found\nExecution finished."
    }
    assert summary("aborted", {"taskId": "t-2"}, held_back=3) == (
        "Qlik Sense task t-2 aborted; 3 earlier alert(s) of this task held back"
    )
    assert signature("k", sent) == "sha256=" + hmac.new(b"k", sent, hashlib.sha256).hexdigest()
