"""The settings' models: the configuration reference.

Every field has a default (except the connection targets) and a description, unknown keys are
errors, and cross-field rules are validators. Reading a file into these models is load.py's;
writing docs/configuration.md from them is reference.py's.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from mqtt_starter.core.routing import TopicFilter


def plain_name(value: str, why: str = "") -> str:
    """A name that can stand in a topic level, a metric label and a log line."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", value):
        raise ValueError(f"letters, digits, `_`, `.` and `-`{why}")
    return value


class Section(BaseModel):
    """A configuration section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(Section):
    """TLS to the broker."""

    enabled: bool = Field(False, description="connect to the broker over TLS")
    ca_file: Path | None = Field(
        None,
        description="CA bundle that signed the broker's certificate"
        " (none: the system's trust store)",
    )
    cert_file: Path | None = Field(None, description="client certificate (PEM) for mutual TLS")
    key_file: Path | None = Field(None, description="private key (PEM) of `cert_file`")
    insecure: bool = Field(
        False, description="skip the broker host name check (never in production)"
    )

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class ReconnectSettings(Section):
    """How the daemon reconnects to the broker: jittered exponential backoff."""

    min_s: float = Field(1.0, gt=0, description="first wait before reconnecting to the broker")
    max_s: float = Field(60.0, gt=0, description="longest wait between reconnect attempts")


class MqttSettings(Section):
    """The broker, the session, and the daemon's topics."""

    host: str = Field("localhost", description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="broker port (8883 is usual with TLS)")
    client_id: str = Field(
        "mqtt-starter",
        min_length=1,
        max_length=128,
        description="fixed client id: the persistent session hangs on it",
    )
    username: str | None = Field(None, description="broker user name")
    password: SecretStr | None = Field(None, description="broker password")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version: 5 or 3.1.1")
    tls: TlsSettings = Field(TlsSettings(), description="TLS to the broker")
    base_topic: str = Field("butler", min_length=1, description="first levels of every topic")
    session_expiry_s: int = Field(
        86400,
        ge=0,
        description="how long the broker keeps the"
        " session (and queued triggers) while the daemon is away",
    )
    accept_retained: bool = Field(
        False,
        description="act on retained trigger messages (a"
        " retained start would fire at every reconnect)",
    )
    reply_topic_allow: list[str] = Field(
        ["#"], min_length=1, description="filters a reply topic must match"
    )
    shared_group: str | None = Field(
        None,
        description="subscribe as $share/<group>/... so that several instances share the triggers",
    )
    keepalive_s: int = Field(60, ge=5, le=65535, description="MQTT keep-alive interval")
    max_in_flight: int = Field(
        100,
        ge=1,
        le=65535,
        description="triggers taken from the broker at once, each acknowledged once served; the"
        " broker holds the rest (MQTT 5 Receive Maximum; for 3.1.1, mosquitto's"
        " max_inflight_messages)",
    )
    stop_timeout_s: float = Field(
        30.0,
        gt=0,
        description="at a stop, how long requests in"
        " flight may take to finish; the rest are redelivered later",
    )
    reconnect: ReconnectSettings = Field(
        ReconnectSettings(),
        description="broker reconnect backoff (jittered, exponential)",
    )
    hold_max_messages: int = Field(
        10_000,
        ge=1,
        description="replies, status events and task states held while the broker cannot be"
        " reached, published in order after the reconnect; beyond this the oldest are dropped"
        " (counted in the log)",
    )

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: Any) -> Any:
        text = str(value)
        return {"5": "5", "5.0": "5", "3.1.1": "3.1.1", "311": "3.1.1"}.get(text, text)

    @field_validator("base_topic")
    @classmethod
    def _base(cls, value: str) -> str:
        if any(c in value for c in "+#") or value.startswith(("$", "/")) or value.endswith("/"):
            raise ValueError("no wildcards, no leading $ or /, no trailing /")
        return value

    @field_validator("reply_topic_allow")
    @classmethod
    def _filters(cls, value: list[str]) -> list[str]:
        for text in value:
            TopicFilter.parse(text)
        return value

    @field_validator("shared_group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c in value for c in "/+#")):
            raise ValueError("a non-empty name without / + #")
        return value


class RetrySettings(Section):
    """Retries of a site call: attempts and backoff."""

    attempts: int = Field(5, ge=1, le=100, description="tries of one call, the first included")
    backoff_s: float = Field(
        0.5,
        ge=0,
        description="wait before the first retry; doubles each time, with full jitter",
    )
    max_backoff_s: float = Field(30.0, ge=0, description="longest wait between two tries")


class QrsSettings(Section):
    """A client-managed Sense site: the QRS URL, how the daemon proves who it is, limits."""

    url: str = Field(
        description="QRS base URL: https://host:4242, or https://host/<prefix> for a virtual proxy"
    )
    auth: Literal["certificate", "jwt"] = Field(
        "certificate",
        description="certificate (mutual TLS on 4242) or jwt (bearer via a virtual proxy)",
    )
    cert_file: Path = Field(
        Path("/etc/mqtt-starter/client.pem"),
        description="client certificate exported from the QMC",
    )
    key_file: Path = Field(Path("/etc/mqtt-starter/client_key.pem"), description="its private key")
    ca_file: Path | None = Field(
        Path("/etc/mqtt-starter/root.pem"),
        description="root.pem that signed the Sense server certificate (none: system trust store)",
    )
    verify_hostname: bool = Field(
        True,
        description="check that the server certificate names the host; false: verify only"
        " its chain against ca_file (Sense's certificates name the node's host name)",
    )
    server_name: str | None = Field(
        None,
        description="the host name the server certificate must name, when the URL uses"
        " another name or an IP address",
    )
    insecure: bool = Field(
        False,
        description="do not verify the QRS server certificate at all (warned at every start);"
        " prefer verify_hostname or server_name",
    )
    jwt: SecretStr | None = Field(None, description="JWT for a JWT virtual proxy")
    jwt_file: Path | None = Field(
        None,
        description="file holding the JWT instead of `jwt`; read again when it changes",
    )
    session_cookie: str | None = Field(
        None,
        description="the virtual proxy's session cookie name (the admin's choice in the QMC);"
        " none: any cookie the proxy sets is kept and sent back",
    )
    user_directory: str = Field("INTERNAL", description="X-Qlik-User UserDirectory")
    user_id: str = Field("sa_repository", description="X-Qlik-User UserId")
    timeout_s: float = Field(30.0, gt=0, description="time limit of one QRS call")
    max_concurrency: int = Field(8, ge=1, le=256, description="QRS calls in flight at once")
    poll_interval_s: float = Field(2.0, gt=0, description="how often a running execution is polled")
    retry: RetrySettings = Field(
        RetrySettings(), description="retries on connection errors, timeouts and 5xx"
    )

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+(/[^\s?#]*)?$", value):
            raise ValueError("an http(s) URL without query or fragment")
        return value.rstrip("/")

    @field_validator("user_directory", "user_id")
    @classmethod
    def _header_safe(cls, value: str) -> str:
        if not value or any(c in value for c in ";=\r\n"):
            raise ValueError("must not be empty or contain ; = or line breaks")
        return value

    @field_validator("server_name")
    @classmethod
    def _server_name(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", value):
            raise ValueError("a host name (letters, digits, dots and hyphens)")
        return value

    @model_validator(mode="after")
    def _auth(self) -> QrsSettings:
        if self.jwt is not None and self.jwt_file is not None:
            raise ValueError("give jwt or jwt_file, not both")
        if self.auth == "jwt" and self.jwt is None and self.jwt_file is None:
            raise ValueError("auth: jwt needs `jwt` or `jwt_file`")
        return self


class CloudSettings(Section):
    """A Qlik Cloud tenant: its URL, the API key or OAuth client, limits."""

    tenant_url: str = Field(description="the tenant: https://<tenant>.<region>.qlikcloud.com")
    auth: Literal["api_key", "oauth"] = Field(
        "api_key",
        description="api_key (a user's API key) or oauth (a machine-to-machine OAuth client,"
        " client credentials)",
    )
    api_key: SecretStr | None = Field(None, description="the API key (or api_key_file)")
    client_id: str | None = Field(None, description="the OAuth client's id")
    client_secret: SecretStr | None = Field(
        None, description="the OAuth client's secret (or client_secret_file)"
    )
    scope: str = Field(
        "user_default",
        min_length=1,
        description="OAuth scopes sent with the token request, space-separated (a client"
        " without scopes can reach nothing)",
    )
    timeout_s: float = Field(30.0, gt=0, description="time limit of one API call")
    max_concurrency: int = Field(8, ge=1, le=256, description="API calls in flight at once")
    poll_interval_s: float = Field(5.0, gt=0, description="how often a running reload is polled")
    max_starts_per_minute: int = Field(
        50,
        ge=1,
        description="reloads started per minute at most (Qlik's limit for POST /api/v1/reloads);"
        " more wait their turn, in order",
    )
    retry: RetrySettings = Field(
        RetrySettings(), description="retries on connection errors, timeouts and 5xx"
    )
    ca_file: Path | None = Field(
        None,
        description="a private CA to trust (a TLS-inspecting proxy); none: the system store."
        " HTTPS_PROXY and NO_PROXY from the environment are honoured",
    )

    @field_validator("tenant_url")
    @classmethod
    def _tenant(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s?#]+/?$", value):
            raise ValueError("the tenant's https URL, without a path")
        return value.rstrip("/")

    @property
    def url(self) -> str:
        return self.tenant_url

    @model_validator(mode="after")
    def _auth(self) -> CloudSettings:
        if self.auth == "api_key" and self.api_key is None:
            raise ValueError("auth: api_key needs `api_key` or `api_key_file`")
        if self.auth == "oauth" and (self.client_id is None or self.client_secret is None):
            raise ValueError("auth: oauth needs `client_id` and `client_secret`")
        return self


class CustomPropertySelector(Section):
    """A custom property value: its name and value."""

    name: str = Field(min_length=1, description="custom property name")
    value: str = Field(description="custom property value")


class AllowList(Section):
    """Which tasks may be started: by id, tag, custom property value or space."""

    task_ids: list[str] = Field(
        [], description="task ids (Qlik Cloud: app ids) that may be started"
    )
    tags: list[str] = Field([], description="tasks with one of these tags may be started")
    custom_properties: list[CustomPropertySelector] = Field(
        [], description="tasks with one of these custom property values may be started"
    )
    spaces: list[str] = Field([], description="Qlik Cloud: apps in these spaces may be started")


class PolicySettings(Section):
    """What may be started, and how requests are limited and remembered."""

    allow: AllowList | None = Field(
        None,
        description="which tasks may be started; none: every task (warned at start)",
    )
    on_running: Literal["skip", "start"] = Field(
        "skip",
        description="skip (already_running) or start a task that is already running",
    )
    dedupe_window_s: float = Field(
        600.0,
        ge=0,
        description="a repeat (the same requestId and the same request) within this window is"
        " answered from memory",
    )
    dedupe_max_entries: int = Field(
        100_000,
        ge=1,
        description="requestIds remembered at most (about 2 KB each, so 200 MB at the default"
        " when full); the oldest go first. The memory is not kept across restarts",
    )
    max_payload_bytes: int = Field(65536, ge=64, description="larger payloads are refused")
    max_tasks_per_request: int = Field(
        100,
        ge=1,
        description="a request with more selectors than this, or whose selectors match more"
        " tasks, is refused as a whole (too_many_tasks); nothing is started",
    )


class WhenCondition(Section):
    """A route fires only when a field of the JSON payload equals a value."""

    field: str = Field(min_length=1, description="dotted path into the JSON payload")
    equals: Any = Field(description="the value the field must have")


class RouteSettings(Section):
    """An MQTT topic filter mapped to selectors."""

    topic: str = Field(description="an MQTT filter; {1} in selectors is its first wildcard level")
    task_ids: list[str] = Field([], description="task ids to start")
    tags: list[str] = Field([], description="tags whose tasks to start")
    custom_properties: list[CustomPropertySelector] = Field(
        [], description="custom property values whose tasks to start"
    )
    names: list[str] = Field([], description="task names to start")
    payload_as: Literal["task_id", "name", "tag"] | None = Field(
        None,
        description="the payload's text (trimmed) is the selector, as Butler's own MQTT start"
        " (`qliksense/start_task` with a bare task id); no other selector on the route",
    )
    when: WhenCondition | None = Field(None, description="start only when the payload matches")
    debounce_s: float = Field(
        0.0,
        ge=0,
        description="triggers within this time after a start are answered without starting again",
    )

    @model_validator(mode="after")
    def _check(self) -> RouteSettings:
        topic_filter = TopicFilter.parse(self.topic)
        selectors = self.task_ids or self.tags or self.custom_properties or self.names
        if self.payload_as is not None and (selectors or self.when is not None):
            raise ValueError(
                "payload_as takes the selector from the payload: no task_ids, tags,"
                " custom_properties, names or when on the same route"
            )
        if self.payload_as is None and not selectors:
            raise ValueError(
                "a route needs at least one of task_ids, tags, custom_properties, names,"
                " or payload_as"
            )
        templates = [
            *self.task_ids,
            *self.tags,
            *self.names,
            *(t for cp in self.custom_properties for t in (cp.name, cp.value)),
        ]
        for template in templates:
            for index in re.findall(r"\{(\d+)\}", template):
                if not 1 <= int(index) <= topic_filter.wildcards:
                    raise ValueError(
                        f"{{{index}}} in {template!r}: the topic has"
                        f" {topic_filter.wildcards} wildcard level(s)"
                    )
        return self


class StatusSettings(Section):
    """Status events of the runs the daemon started, and how long a `wait` lasts."""

    publish_task_events: bool = Field(
        True,
        description="publish each state change of started"
        " executions on <base>/status/task/<taskId>",
    )
    wait_timeout_s: float = Field(
        86400.0,
        gt=0,
        description="longest time an execution is followed (a `wait` request's finished reply"
        " comes at the latest then); a request may ask for less with waitTimeoutS",
    )


class MonitorScope(Section):
    """The tasks the monitor watches."""

    task_ids: list[str] = Field([], description="tasks watched by id")
    tags: list[str] = Field([], description="tasks with one of these tags are watched")
    custom_properties: list[CustomPropertySelector] = Field(
        [], description="tasks with one of these custom property values are watched"
    )


class MonitorSettings(Section):
    """Watching every run of the site (DESIGN.md section 7)."""

    enabled: bool = Field(
        False,
        description="watch every run of the tasks in scope, whoever started it, and publish its"
        " state changes, retained task states, and failure and abort events",
    )
    interval_s: float = Field(
        10.0, gt=0, description="how often QRS is asked what changed (one query each time)"
    )
    scope: MonitorScope | None = Field(None, description="which tasks are watched; none: all")
    retain_state: bool = Field(
        True, description="publish <base>/state/task/<taskId> retained (false: not at all)"
    )
    log_tail_lines: int = Field(
        30, ge=0, le=1000, description="lines of a failed reload's script log sent as its reason"
    )
    overlap_s: float = Field(
        10.0,
        ge=0,
        description="each query reaches this far behind the newest change seen, so a change"
        " QRS commits late is not lost (what was published already is skipped)",
    )
    lookback_s: float = Field(
        3600.0,
        ge=0,
        description="with no task state retained on the broker yet (the very first start),"
        " runs that changed this long ago are published",
    )
    deleted_check_s: float = Field(
        300.0,
        gt=0,
        description="how often the tasks with a retained state are checked for deletion"
        " (their state is cleared)",
    )


class HttpTls(Section):
    """HTTPS for the endpoint: a certificate and its key, both or neither."""

    cert_file: Path | None = Field(None, description="the endpoint's certificate (PEM)")
    key_file: Path | None = Field(None, description="its private key (PEM)")

    @model_validator(mode="after")
    def _pair(self) -> HttpTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file (HTTPS), or neither (HTTP)")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class HttpSettings(Section):
    """The HTTP endpoint: health, metrics, Butler's REST start, the status page."""

    enabled: bool = Field(
        False, description="serve health, metrics and Butler's REST start endpoint"
    )
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8080, ge=0, le=65535, description="port to listen on")
    token: SecretStr | None = Field(
        None,
        description="bearer token required by every route (the start route takes it only in"
        " the Authorization header)",
    )
    allow_no_token: bool = Field(
        False,
        description="listen beyond loopback without a token (anyone who reaches the port can"
        " start tasks): needed for a non-loopback host without `token`",
    )
    max_connections: int = Field(
        512,
        ge=1,
        description="open connections at most (and always below the process's file limit);"
        " at the cap the oldest idle connection makes room",
    )
    request_timeout_s: float = Field(
        10.0, gt=0, description="time a connection has to send a complete request"
    )
    session_max_age_s: float = Field(
        28_800.0,
        gt=0,
        description="how long the status page's cookie (opened with /?token=) is good for",
    )
    tls: HttpTls = Field(HttpTls(), description="HTTPS: set cert_file and key_file")

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> HttpSettings:
        open_to_all = self.token is None and not self.allow_no_token
        if self.enabled and open_to_all and not _loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is beyond loopback and there is no token: set"
                " http.token, or http.allow_no_token: true to accept that anyone who"
                " reaches the port can start tasks"
            )
        return self


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ChainAfter(Section):
    """The upstream tasks of a chain: a run of any of them that ends as `on` says fires it."""

    task_ids: list[str] = Field([], description="upstream task ids")
    tags: list[str] = Field([], description="upstream tasks with one of these tags")
    names: list[str] = Field([], description="upstream task names")


class ChainStart(Section):
    """What a chain starts: selectors, as in a request."""

    task_ids: list[str] = Field([], description="task ids to start")
    tags: list[str] = Field([], description="tags whose tasks to start")
    custom_properties: list[CustomPropertySelector] = Field(
        [], description="custom property values whose tasks to start"
    )
    names: list[str] = Field([], description="task names to start")


class ChainSettings(Section):
    """When one run ends, start the next (DESIGN.md section 11)."""

    name: str = Field(description="the chain's name: its requests' requestId and reply topic")
    after: ChainAfter = Field(description="the upstream tasks")
    on: Literal["success", "failure", "finished"] = Field(
        "success",
        description="success (FinishedSuccess), failure (FinishedFail or Error), finished (any"
        " end, aborted and skipped included)",
    )
    start: ChainStart = Field(description="the tasks to start")
    wait: bool = Field(
        False, description="follow the started runs (status events, a finished reply)"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return plain_name(value, " (it is a topic level)")

    @model_validator(mode="after")
    def _no_self_loop(self) -> ChainSettings:
        after, start = self.after, self.start
        if not (after.task_ids or after.tags or after.names):
            raise ValueError("after: name at least one upstream task id, tag or name")
        if not (start.task_ids or start.tags or start.custom_properties or start.names):
            raise ValueError("start: name at least one task id, tag, custom property or name")
        ids = {i.strip().lower() for i in after.task_ids} & {
            i.strip().lower() for i in start.task_ids
        }
        names = {n.casefold() for n in after.names} & {n.casefold() for n in start.names}
        if ids or names:
            looped = sorted(ids | names)[0]
            raise ValueError(
                f"start names {looped!r}, one of its own `after` tasks: the chain would loop"
            )
        return self


class WebhookRetry(Section):
    """Retries of one webhook delivery."""

    attempts: int = Field(6, ge=1, le=100, description="tries of one delivery, the first included")
    backoff_s: float = Field(
        1.0, ge=0, description="wait before the first retry; doubles each time"
    )
    max_backoff_s: float = Field(
        300.0, ge=0, description="longest wait between two tries (a Retry-After included)"
    )


class WebhookSettings(Section):
    """One receiver of the monitor's alerts (DESIGN.md section 10)."""

    name: str = Field(description="the webhook's name in logs, metrics and the status page")
    url: SecretStr = Field(
        description="http(s) URL the events are POSTed to (a secret: it often holds a token)"
    )
    events: list[Literal["failed", "aborted", "succeeded"]] = Field(
        ["failed", "aborted"], description="the kinds of run end sent"
    )
    scope: MonitorScope | None = Field(
        None, description="the tasks whose runs are sent; none: every task the monitor watches"
    )
    format: Literal["json", "text"] = Field(
        "json",
        description='json: the event as published on MQTT, with "event"; text: {"text": one'
        " line and the reason} (Slack, Mattermost, Google Chat)",
    )
    headers: dict[str, str] = Field(
        {}, description="headers sent with each POST (name: value; `${VAR}` for a token)"
    )
    secret: SecretStr | None = Field(
        None,
        description="HMAC key: X-Mqtt-Starter-Signature: sha256=<HMAC-SHA256 of the body, hex>",
    )
    per_task_interval_s: float = Field(
        0.0,
        ge=0,
        description="at most one alert per task in this time; the ones held back are counted"
        " in the next (heldBack)",
    )
    timeout_s: float = Field(10.0, gt=0, description="longest wait for one answer")
    retry: WebhookRetry = Field(WebhookRetry(), description="retries of one delivery")
    queue_max: int = Field(
        1000,
        ge=1,
        le=1_000_000,
        description="deliveries waiting for this receiver; beyond it the oldest is dropped"
        " (counted and logged)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return plain_name(value)

    @field_validator("url")
    @classmethod
    def _url(cls, value: SecretStr) -> SecretStr:
        # The URL is not repeated in the message: it is a secret.
        if not re.match(r"^https?://[^\s/]+", value.get_secret_value(), re.IGNORECASE):
            raise ValueError("an http:// or https:// URL with a host")
        return value


class AlertSettings(Section):
    """Alerts to people: the monitor's run ends POSTed to webhooks (DESIGN.md section 10)."""

    webhooks: list[WebhookSettings] = Field(
        [], description="receivers of the run ends (needs monitor.enabled)"
    )


class LogSettings(Section):
    """Where and how the daemon logs."""

    level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = Field(
        "INFO", description="lowest level written"
    )
    format: Literal["text", "json"] = Field(
        "text", description="text (journald friendly) or json, one object a line"
    )
    file: Path | None = Field(
        None,
        description="write the log to this file, rotated by size, instead of stderr; without a"
        " console"
        " (a Windows service) the log goes to %ProgramData%\\mqtt-starter\\logs\\"
        "mqtt-starter.log when this is not set",
    )
    rotate_mb: float = Field(10, gt=0, description="log.file: start a new file past this size")
    keep_files: int = Field(5, ge=1, description="log.file: rotated files kept")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Settings(Section):
    """The whole configuration: exactly one site (`qrs` or `cloud`) and the rest."""

    mqtt: MqttSettings = Field(MqttSettings(), description="the broker")
    qrs: QrsSettings | None = Field(
        None, description="a client-managed Sense site: its Repository Service (or `cloud`)"
    )
    cloud: CloudSettings | None = Field(None, description="a Qlik Cloud tenant (or `qrs`)")
    policy: PolicySettings = Field(PolicySettings(), description="what may be started, and limits")
    routes: list[RouteSettings] = Field([], description="IoT/OT topics mapped to selectors")
    status: StatusSettings = Field(StatusSettings(), description="status events")
    monitor: MonitorSettings = Field(
        MonitorSettings(), description="watching every task run, whoever started it"
    )
    http: HttpSettings = Field(HttpSettings(), description="the HTTP endpoint")
    alerts: AlertSettings = Field(AlertSettings(), description="alerts to people: webhooks")
    chains: list[ChainSettings] = Field(
        [], description="when one run ends, start the next (needs monitor.enabled)"
    )
    log: LogSettings = Field(LogSettings(), description="logging")
    watch_config: bool = Field(
        False,
        description="a change of the configuration file reloads it, as SIGHUP does (for"
        " Windows and containers, which have no SIGHUP)",
    )

    @model_validator(mode="after")
    def _one_site(self) -> Settings:
        if (self.qrs is None) == (self.cloud is None):
            raise ValueError("give exactly one site: `qrs` (client-managed Sense) or `cloud`")
        if self.cloud is not None and self.monitor.enabled:
            raise ValueError(
                "monitor.enabled: watching every run is available for QRS sites, not yet for"
                " Qlik Cloud"
            )
        if self.chains and not self.monitor.enabled:
            raise ValueError("chains: a chain is fired by the monitor: set monitor.enabled")
        if self.alerts.webhooks and not self.monitor.enabled:
            raise ValueError("alerts.webhooks: alerts are sent by the monitor: set monitor.enabled")
        hooks = [w.name for w in self.alerts.webhooks]
        if len(set(hooks)) != len(hooks):
            raise ValueError("alerts.webhooks: each webhook needs a name of its own")
        names = [c.name for c in self.chains]
        if len(set(names)) != len(names):
            raise ValueError("chains: each chain needs a name of its own")
        return self

    @property
    def site(self) -> QrsSettings | CloudSettings:
        """The one site this daemon serves."""
        site = self.qrs or self.cloud
        assert site is not None  # _one_site
        return site


# -- loading ---------------------------------------------------------------------------------
