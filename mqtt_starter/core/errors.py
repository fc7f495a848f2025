"""The one exception tree of mqtt-starter.

Foreign exceptions (aiohttp, ssl, paho, pydantic) are translated into these at the edge that
calls the foreign library; nothing above that edge catches anything else.

    MqttStarterError                 code "internal"
    ├── ConfigError                  invalid configuration; carries every problem, exit 78
    ├── RequestError                 a request refused; `code` is the reply's error code
    │   ├── BadPayload               "bad_payload"
    │   ├── BadTopic                 "bad_topic"
    │   ├── PayloadTooLarge          "payload_too_large"
    │   ├── TooManyTasks             "too_many_tasks"
    │   └── ReplyTopicRefused        "reply_topic_refused"
    ├── QrsError                     "qrs_unavailable" unless a subclass says otherwise
    │   ├── QrsUnavailable           connection errors, timeouts, 5xx after the last retry
    │   │   └── QrsAnswerLost        a call not safe to repeat may have reached QRS; no answer
    │   ├── QrsAuthError             401/403 or a TLS failure: retrying cannot help
    │   ├── QrsRequestError          any other 4xx: the request itself was wrong ("internal")
    │   └── LogNotReady              a run's script log is not written yet: ask again later
    └── MqttLinkError                the broker refused or dropped the connection
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h; systemd units stop restarting on it


class MqttStarterError(Exception):
    code = "internal"


@dataclass(frozen=True)
class ConfigProblem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(MqttStarterError):
    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))

    @classmethod
    def unusable(cls, key: str, path: object, exc: OSError) -> ConfigError:
        """A file the settings name exists but cannot be used (ssl.SSLError is an OSError)."""
        return cls([ConfigProblem(key, f"{path} cannot be used: {exc.strerror or exc}")])


class RequestError(MqttStarterError):
    code = "bad_payload"


class BadPayload(RequestError):
    code = "bad_payload"


class BadTopic(RequestError):
    code = "bad_topic"


class PayloadTooLarge(RequestError):
    code = "payload_too_large"


class TooManyTasks(RequestError):
    code = "too_many_tasks"


class ReplyTopicRefused(RequestError):
    code = "reply_topic_refused"


class QrsError(MqttStarterError):
    code = "qrs_unavailable"

    def __init__(
        self, message: str, *, status: int | None = None, path: str = "", detail: str = ""
    ) -> None:
        self.status = status
        self.path = path
        self.detail = detail  # QRS's own text, when it answered
        super().__init__(message)


class QrsUnavailable(QrsError):
    pass


class QrsAnswerLost(QrsUnavailable):
    pass


class QrsAuthError(QrsError):
    pass


class QrsRequestError(QrsError):
    # QRS is up but refused what it was sent: not "unavailable", a fault on this side.
    code = "internal"


class LogNotReady(QrsError):
    """The site has not written a finished run's log yet (404 or empty for a few seconds)."""


class MqttLinkError(MqttStarterError):
    pass
