"""Simulated tasks as a fixture file describes them (YAML or JSON), validated with pydantic."""

from __future__ import annotations

import json
import uuid
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class Outcome(BaseModel):
    """How each execution of a task goes."""

    model_config = ConfigDict(extra="forbid")
    duration_s: float = Field(1.0, ge=0, description="time from Started to the end")
    result: Literal["success", "fail"] = Field("success", description="how the last attempt ends")
    failures: int = Field(0, ge=0, description="attempts that fail before one succeeds")
    queue_s: float = Field(0.0, ge=0, description="time spent Queued before a start slot")
    message: str = Field("", description="detail message of a failed attempt")
    log_lines: int = Field(
        8, ge=0, description="lines of script between the header and the end of a reload's log"
    )


class TaskFixture(BaseModel):
    """A simulated task: its type, tags, custom properties and how its runs go."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    name: str
    type: Literal["reload", "external", "usersync", "distribute", "preload"] = "reload"
    enabled: bool = True
    startable: bool = Field(
        True,
        description="false: every start is answered with the empty GUID although the task is"
        " enabled and idle, as QRS does when no scheduler is available or the app is not",
    )
    app: str = ""
    tags: list[str] = []
    custom_properties: dict[str, str | list[str]] = Field({}, alias="customProperties")
    max_retries: int = Field(0, ge=0, alias="maxRetries")
    outcome: Outcome = Outcome()
    schedule_s: float | None = Field(
        None,
        gt=0,
        description="the simulator starts the task itself every schedule_s seconds, as a"
        " schedule trigger does (runs nobody started through the API)",
    )

    @field_validator("id")
    @classmethod
    def _lower_id(cls, value: str) -> str:
        return str(uuid.UUID(value))


class Variants(BaseModel):
    """Which answer the server gives where qrs-api.md section 6 leaves it open. The defaults
    are the answers a real site is most likely to give, not the politest."""

    model_config = ConfigDict(extra="forbid")
    log_content_type: Literal["octet-stream", "text", "text-charset", "bom"] = Field(
        "octet-stream",
        description="the script log download: application/octet-stream; text/plain without"
        " charset; text/plain; charset=utf-8; or octet-stream starting with a UTF-8 BOM",
    )
    log_call_body: Literal["string", "object"] = Field(
        "string",
        description="scriptlogfile's answer: a bare JSON string (Qlik's reference) or"
        ' {"value": ...}',
    )
    missing_log_call_status: Literal[400, 404, 405, 500] = Field(
        404,
        description="how a log call the server does not offer (script_log_api) answers; 500:"
        " it fails every time",
    )
    log_ready_after_reads: int = Field(
        0,
        ge=0,
        description="a finished run's log is not there for this many reads (of either log"
        " call or the download), as on a large site for a few seconds after FinishedFail",
    )
    log_not_ready_as: Literal["404", "empty"] = Field(
        "404", description="what a log that is not there yet answers: 404, or an empty log"
    )
    date_filter_offset_s: float = Field(
        0.0,
        description="a date literal in a filter is read as the server's local time at this"
        " offset from UTC (0: as UTC)",
    )
    date_milliseconds: bool = Field(
        True, description="dates are written with milliseconds (false: whole seconds)"
    )
    session_cookie: str | None = Field(
        None, description="the proxy's session cookie name (none: X-Qlik-Session-<prefix>)"
    )
    running_start: Literal["empty-guid", "new-session"] = Field(
        "empty-guid",
        description="start/synchronous of a task already running: the empty GUID, or a new"
        " session id (the run then queues behind the one running)",
    )


class Fixture(BaseModel):
    """The simulated site: tasks, limits, read rights, variants."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    max_concurrent: int = Field(4, ge=1, description="executions Started at once; others Queue")
    results_per_task: int = Field(
        20,
        ge=1,
        description="finished executions kept per task; older ones are deleted, as QRS cleans"
        " up old execution results",
    )
    without_read_rights: list[str] = Field(
        [],
        description="users (DIRECTORY\\\\ID of X-Qlik-User) without read rights on execution"
        " results and sessions: they get [] from executionresult and 403 from executionsession",
    )
    journal_limit: int = Field(
        20_000, ge=100, description="journal entries kept; the oldest half goes when it is full"
    )
    script_log_api: Literal["both", "new", "old"] = Field(
        "both",
        description="which generation of the script log call the server offers (qrs-api.md"
        " section 4): new = reloadtask/{id}/scriptlogfile, old = reloadtask/{id}/scriptlog;"
        " the other answers 404",
    )
    variants: Variants = Field(Variants(), description="answers to qrs-api.md section 6")
    tasks: list[TaskFixture] = []


class FixtureError(ValueError):
    """A fixture file the simulator cannot use."""

    pass


def parse_fixture(text: str, *, source: str = "fixture") -> Fixture:
    try:
        data = yaml.safe_load(text) if text.strip() else {}
        return Fixture.model_validate(data)
    except (yaml.YAMLError, json.JSONDecodeError, ValidationError) as exc:
        raise FixtureError(f"{source}: {exc}") from None


def load_fixture(path: Path | None = None) -> Fixture:
    """Tasks from `path`, or the sample tasks shipped with the package."""
    if path is None:
        text = resources.files(__package__).joinpath("sample-tasks.yaml").read_text("utf-8")
        return parse_fixture(text, source="sample-tasks.yaml")
    return parse_fixture(path.read_text("utf-8"), source=str(path))
