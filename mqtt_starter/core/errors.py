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
    """The root of the one exception tree; its `code` is the reply's error code."""

    code = "internal"


@dataclass(frozen=True)
class ConfigProblem:
    """One problem of a configuration: the key path and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(MqttStarterError):
    """A configuration the daemon cannot use, with every problem at once (exit 78)."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))

    @classmethod
    def unusable(cls, key: str, path: object, exc: OSError) -> ConfigError:
        """A file the settings name exists but cannot be used (ssl.SSLError is an OSError)."""
        return cls([ConfigProblem(key, f"{path} cannot be used: {exc.strerror or exc}")])


class RequestError(MqttStarterError):
    """A request refused; `code` is the reply's error code."""

    code = "bad_payload"


class BadPayload(RequestError):
    """Invalid JSON, wrong types, unknown fields, bad values."""

    code = "bad_payload"


class BadTopic(RequestError):
    """A topic that names no valid selector."""

    code = "bad_topic"


class PayloadTooLarge(RequestError):
    """A payload over `policy.max_payload_bytes`."""

    code = "payload_too_large"


class TooManyTasks(RequestError):
    """More selectors, or matched tasks, than `policy.max_tasks_per_request`."""

    code = "too_many_tasks"


class ReplyTopicRefused(RequestError):
    """A reply topic the rules of the protocol do not allow."""

    code = "reply_topic_refused"


class QrsError(MqttStarterError):
    """The site failed or refused a call; carries the status, path and the site's text."""

    code = "qrs_unavailable"

    def __init__(
        self, message: str, *, status: int | None = None, path: str = "", detail: str = ""
    ) -> None:
        self.status = status
        self.path = path
        self.detail = detail  # QRS's own text, when it answered
        super().__init__(message)


class QrsUnavailable(QrsError):
    """The site cannot be reached, after the retries."""

    pass


class QrsAnswerLost(QrsUnavailable):
    """A call that is not safe to repeat may have reached the site; no answer came."""

    pass


class QrsAuthError(QrsError):
    """The site refuses who we are (401, 403, TLS): retrying cannot help."""

    pass


class QrsRequestError(QrsError):
    # QRS is up but refused what it was sent: not "unavailable", a fault on this side.
    """The site refuses what it was asked (another 4xx)."""

    code = "internal"


class LogNotReady(QrsError):
    """The site has not written a finished run's log yet (404 or empty for a few seconds)."""


class MqttLinkError(MqttStarterError):
    """The broker refused or dropped the connection."""

    pass
