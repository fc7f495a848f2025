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


class Fixture(BaseModel):
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
    tasks: list[TaskFixture] = []


class FixtureError(ValueError):
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
