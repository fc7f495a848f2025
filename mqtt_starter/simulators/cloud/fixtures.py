"""The simulated tenant as a fixture file describes it (YAML or JSON), validated with pydantic."""

from __future__ import annotations

import json
import uuid
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Outcome(BaseModel):
    """How each reload of an app goes."""

    model_config = ConfigDict(extra="forbid")
    duration_s: float = Field(1.0, ge=0, description="time in RELOADING")
    queue_s: float = Field(0.0, ge=0, description="time in QUEUED before it reloads")
    result: Literal["success", "fail", "exceeded"] = "success"
    error_code: str = Field("", description="errorCode of a failed reload")
    message: str = Field("", description="errorMessage of a failed reload")
    log_lines: int = Field(8, ge=0, description="lines of script in the reload log")


class App(BaseModel):
    """A simulated app: its space, tags and how its reloads go."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    name: str
    space: str | None = Field(None, description="the space's name; none: a personal app")
    tags: list[str] = []
    reloadable: bool = Field(True, description="false: a reload is refused with 403 RELOADS-003")
    outcome: Outcome = Outcome()


class OAuthClient(BaseModel):
    """An OAuth client the simulated tenant accepts."""

    model_config = ConfigDict(extra="forbid")
    client_id: str
    client_secret: str


class CloudVariants(BaseModel):
    """Which answer the tenant gives where qlik-cloud-api.md leaves it open."""

    model_config = ConfigDict(extra="forbid")
    log_ready_after_reads: int = Field(
        0, ge=0, description="a finished reload's log answers 404 for this many reads"
    )
    proxy_429_next: int = Field(
        0,
        ge=0,
        description="the next API calls answered 429 with an HTML page by a proxy in front"
        " (neither a rate limit nor a pending reload)",
    )


class CloudFixture(BaseModel):
    """The simulated tenant: credentials, limits, spaces, apps, variants."""

    model_config = ConfigDict(extra="forbid")
    api_keys: list[str] = Field(["sim-api-key"], description="bearer keys accepted")
    oauth_clients: list[OAuthClient] = [
        OAuthClient(client_id="sim-client", client_secret="sim-secret")
    ]
    token_lifetime_s: float = Field(3600.0, gt=0, description="expires_in of an OAuth token")
    reload_limit: int = Field(50, ge=1, description="POST /api/v1/reloads allowed per window")
    reload_window_s: float = Field(60.0, gt=0, description="the window of reload_limit")
    reload_quota: int | None = Field(
        None, description="reloads the tenant may start in all; more get 403 RELOADS-013"
    )
    journal_limit: int = Field(20_000, ge=100)
    variants: CloudVariants = CloudVariants()
    spaces: list[str] = []
    apps: list[App] = []


class FixtureError(ValueError):
    """A fixture file the simulator cannot use."""

    pass


def parse_cloud_fixture(text: str, *, source: str = "fixture") -> CloudFixture:
    try:
        data = yaml.safe_load(text) if text.strip() else {}
        return CloudFixture.model_validate(data)
    except (yaml.YAMLError, json.JSONDecodeError, ValidationError) as exc:
        raise FixtureError(f"{source}: {exc}") from None


def load_cloud_fixture(path: Path | None = None) -> CloudFixture:
    """Apps from `path`, or the sample tenant shipped with the package."""
    if path is None:
        text = resources.files(__package__).joinpath("sample-apps.yaml").read_text("utf-8")
        return parse_cloud_fixture(text, source="sample-apps.yaml")
    return parse_cloud_fixture(path.read_text("utf-8"), source=str(path))
