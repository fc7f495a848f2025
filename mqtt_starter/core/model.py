"""Plain values that flow through mqtt-starter: selectors, requests, tasks, executions, replies.

Everything here is a frozen dataclass or an enum with no behaviour beyond naming itself; the
rules that combine these values live in the core modules (codec, routing, qrs_query, resolution,
policy), and I/O lives in the shells.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class SelectorKind(StrEnum):
    """How a selector chooses tasks."""

    ID = "id"
    TAG = "tag"
    CUSTOM_PROPERTY = "cp"
    NAME = "name"
    SPACE = "space"  # Qlik Cloud: the apps of a space


@dataclass(frozen=True)
class Selector:
    """One way of choosing tasks; a custom property has a `name` and a `value`."""

    kind: SelectorKind
    value: str
    name: str = ""

    @property
    def label(self) -> str:
        """How the selector is named in `unmatched` and in logs: `tag:Nightly`, `cp:group=a`."""
        if self.kind is SelectorKind.CUSTOM_PROPERTY:
            return f"cp:{self.name}={self.value}"
        return f"{self.kind.value}:{self.value}"

    @property
    def match_label(self) -> str:
        """How the selector is named in a task's `matchedBy`.

        An id or a name designates the task itself, so the kind alone says how it matched.
        """
        if self.kind in (SelectorKind.ID, SelectorKind.NAME):
            return self.kind.value
        return self.label


class TaskStatus(IntEnum):
    """QRS TaskExecutionStatus codes (qrs-api.md section 4)."""

    NEVER_STARTED = 0
    TRIGGERED = 1
    STARTED = 2
    QUEUED = 3
    ABORT_INITIATED = 4
    ABORTING = 5
    ABORTED = 6
    FINISHED_SUCCESS = 7
    FINISHED_FAIL = 8
    SKIPPED = 9
    RETRY = 10
    ERROR = 11
    RESET = 12
    DISTRIBUTION_QUEUE = 13
    DISTRIBUTION_RUNNING = 14

    @property
    def qrs_name(self) -> str:
        return _STATUS_NAMES[self]

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_STATUS_NAMES = {
    TaskStatus.NEVER_STARTED: "NeverStarted",
    TaskStatus.TRIGGERED: "Triggered",
    TaskStatus.STARTED: "Started",
    TaskStatus.QUEUED: "Queued",
    TaskStatus.ABORT_INITIATED: "AbortInitiated",
    TaskStatus.ABORTING: "Aborting",
    TaskStatus.ABORTED: "Aborted",
    TaskStatus.FINISHED_SUCCESS: "FinishedSuccess",
    TaskStatus.FINISHED_FAIL: "FinishedFail",
    TaskStatus.SKIPPED: "Skipped",
    TaskStatus.RETRY: "Retry",
    TaskStatus.ERROR: "Error",
    TaskStatus.RESET: "Reset",
    TaskStatus.DISTRIBUTION_QUEUE: "DistributionQueue",
    TaskStatus.DISTRIBUTION_RUNNING: "DistributionRunning",
}
_TERMINAL = frozenset(
    {
        TaskStatus.ABORTED,
        TaskStatus.FINISHED_SUCCESS,
        TaskStatus.FINISHED_FAIL,
        TaskStatus.SKIPPED,
        TaskStatus.ERROR,
        TaskStatus.RESET,
    }
)


@dataclass(frozen=True)
class CustomPropertyValue:
    """One custom property value of a task."""

    name: str
    value: str


@dataclass(frozen=True)
class TaskRef:
    """What mqtt-starter knows of a QRS task."""

    id: str
    name: str
    task_type: int = 0
    enabled: bool = True
    tags: tuple[str, ...] = ()
    custom_properties: tuple[CustomPropertyValue, ...] = ()
    last_status: TaskStatus = TaskStatus.NEVER_STARTED
    app_name: str = ""
    app_id: str = ""
    space: str = ""  # Qlik Cloud: the name of the app's space
    # id of operational.lastExecutionResult: it changes when a new run is triggered.
    last_result_id: str = ""

    @property
    def type_name(self) -> str:
        return TASK_TYPE_NAMES.get(self.task_type, f"type {self.task_type}")


# QRS taskType codes (qrs-api.md section 2).
TASK_TYPE_NAMES = {
    0: "Reload",
    1: "ExternalProgram",
    2: "UserSync",
    3: "Distribute",
    4: "Preload",
}


@dataclass(frozen=True)
class Detail:
    """One entry of an execution result's `details`."""

    kind: int  # detailsType: 0 Error, 1 Warning, 2 Information
    message: str
    created: str


@dataclass(frozen=True)
class Execution:
    """One execution result (one attempt) of a task, from /qrs/executionresult."""

    execution_id: str
    task_id: str
    status: TaskStatus
    start_time: str | None = None
    stop_time: str | None = None
    duration_ms: int = 0
    message: str = ""  # the newest detail message (of the errors when there are any)
    reason: str = ""  # the error details, oldest first, one a line
    result_id: str = ""
    modified: str = ""  # modifiedDate: when QRS last changed the result (QRS's clock)
    app_id: str = ""
    file_reference_id: str = ""  # the older script log call's key; "" when none
    script_log: bool = False  # scriptLogAvailable
    details: tuple[Detail, ...] = ()  # oldest first
    state: str = ""  # the site's own name of the state, when it is not QRS (Qlik Cloud)

    @property
    def state_name(self) -> str:
        return self.state or self.status.qrs_name


@dataclass(frozen=True)
class FollowEnd:
    """How following one execution ended: at its final state, at the deadline (`timed_out`,
    with the last state seen), or because QRS no longer let it be followed (`lost` says why:
    the state is Unknown)."""

    last: Execution | None
    timed_out: bool = False
    lost: str | None = None

    @property
    def succeeded(self) -> bool:
        return (
            not self.timed_out
            and self.lost is None
            and self.last is not None
            and self.last.status is TaskStatus.FINISHED_SUCCESS
        )


@dataclass(frozen=True)
class ReloadOptions:
    """What a Qlik Cloud reload may be asked for (`partial`, `weight`, `variables`)."""

    partial: bool | None = None
    weight: int | None = None
    variables: tuple[tuple[str, str], ...] | None = None


@dataclass(frozen=True)
class Request:
    """A start request, whatever door it came through (MQTT topic + payload, or Butler's REST)."""

    selectors: tuple[Selector, ...] = ()
    request_id: str | None = None
    reply_to: str | None = None
    all_task_ids_must_exist: bool = False
    wait: bool = False
    wait_timeout_s: float | None = None  # None: status.wait_timeout_s
    dry_run: bool = False
    reload: ReloadOptions | None = None  # Qlik Cloud only
    ignored: tuple[str, ...] = ()  # kinds of Butler items this daemon does not serve
    lineage: frozenset[str] = frozenset()  # a chain's: tasks that ran before in its lineage


class UnmatchedReason(StrEnum):
    """Why a selector matched no task."""

    INVALID_ID = "invalid_id"
    NOT_FOUND = "not_found"
    NO_TASKS = "no_tasks"
    UNSUPPORTED = "unsupported"  # a selector the site has no equivalent for
    CHAIN_LOOP = "chain_loop"  # a chain's task that already ran in the same lineage


@dataclass(frozen=True)
class Unmatched:
    """A selector that matched no task, and why."""

    selector: Selector
    reason: UnmatchedReason


@dataclass(frozen=True)
class ResolvedTask:
    """A task found for a request, with every selector that matched it."""

    task: TaskRef
    matched_by: tuple[Selector, ...]


@dataclass(frozen=True)
class Resolution:
    """Selectors resolved to tasks: each task once, with every selector that matched it."""

    tasks: tuple[ResolvedTask, ...] = ()
    unmatched: tuple[Unmatched, ...] = ()
    # Tasks that only an id selector chose while allTaskIdsMustExist failed: known, not started.
    withheld: tuple[ResolvedTask, ...] = ()


class TaskResult(StrEnum):
    """What became of one task of a request."""

    STARTED = "started"
    ALREADY_RUNNING = "already_running"
    DENIED = "denied"
    DISABLED = "disabled"
    NOT_STARTED = "not_started"  # QRS declined without a reason a re-read explains
    UNKNOWN = "unknown"  # the start's answer was lost and no run that began after it is seen
    FAILED = "failed"
    DRY_RUN = "dry_run"


@dataclass(frozen=True)
class StartResult:
    """What became of one start call."""

    result: TaskResult
    execution_id: str | None = None
    error: str | None = None
    waited_ms: int = 0  # time the start waited for the site's rate limit


@dataclass(frozen=True)
class TaskOutcome:
    """One task's line in a reply."""

    task: TaskRef
    matched_by: tuple[Selector, ...]
    result: TaskResult
    execution_id: str | None = None
    error: str | None = None
    final: FollowEnd | None = None  # set at stage "finished" for started tasks
    waited_ms: int = 0  # time the start waited for the site's rate limit


class ReplyStatus(StrEnum):
    """A reply's overall status."""

    OK = "ok"
    PARTIAL = "partial"
    ERROR = "error"


@dataclass(frozen=True)
class ErrorInfo:
    """A refused request's error: code and message."""

    code: str
    message: str


@dataclass(frozen=True)
class Reply:
    """The answer to a request, at stage `accepted` or `finished`."""

    status: ReplyStatus
    stage: str = "accepted"
    request_id: str | None = None
    outcomes: tuple[TaskOutcome, ...] = ()
    unmatched: tuple[Unmatched, ...] = ()
    error: ErrorInfo | None = None
    notes: tuple[str, ...] = ()
    replayed: bool = False  # answered again from memory: nothing was started for it
    ignored: tuple[str, ...] = ()  # kinds of Butler items the request had and got no service
