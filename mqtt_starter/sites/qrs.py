"""The QRS client: the QRS API's operations, over the transport both sites share
(transport.py: session, TLS, retries, error mapping, tail reading).

Every call gets a fresh xrfkey (query and header),
the X-Qlik-User header (values URL-encoded), and either the client certificate (port 4242) or a
bearer JWT (virtual proxy, whose session cookie is kept, also for IP hosts). At most
`max_concurrency` calls are in flight. Redirects are never followed: from a proxy, a redirect
or an HTML page means the token was refused.

Retries: a call that is safe to repeat is retried on connection errors, timeouts and 5xx with
full-jitter exponential backoff; 4xx never are. A start is not safe to repeat: it is re-sent
only when it provably never left (the connection could not be made); otherwise its answer is
lost (QrsAnswerLost), and `start_task` re-reads the task instead.

Where qrs-api.md section 6 leaves an answer open, every answer listed is taken: a script log
download of any media type and charset (or none, or a BOM), `scriptlogfile` as an object or a
bare string or missing, a log not written yet (LogNotReady: the caller tries again), filter
dates read as UTC or as the server's local time (`calibrate_dates`), any session cookie name.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import secrets
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote as url_quote
from urllib.parse import urlsplit

from loguru import logger
from yarl import URL

from mqtt_starter.config import QrsSettings
from mqtt_starter.core.errors import (
    ConfigError,
    LogNotReady,
    QrsAnswerLost,
    QrsAuthError,
    QrsError,
    QrsRequestError,
    QrsUnavailable,
)
from mqtt_starter.core.model import (
    Execution,
    ReloadOptions,
    Selector,
    SelectorKind,
    StartResult,
    TaskRef,
    TaskResult,
)
from mqtt_starter.core.monitoring import iso, log_tail, parse_iso
from mqtt_starter.core.qrs_query import (
    EMPTY_GUID,
    changed_filter,
    execution_filter,
    executions_filters,
    normalize_guid,
    parse_execution,
    parse_task,
    result_filter,
    task_filters,
)
from mqtt_starter.core.start_check import explain_declined, lost_unknown, run_after
from mqtt_starter.core.tokens import expiry_warning, token_expiry
from mqtt_starter.sites.http import Answer, Observer, Prepared, TlsFiles, Transport
from mqtt_starter.sites.http import build_ssl_context as build_tls_context

__all__ = ["Observer", "QrsClient"]

# How often a jwt_file is looked at for a new token, and a near expiry warned about again.
TOKEN_CHECK_S = 2.0
EXPIRY_WARN_EVERY_S = 3600.0
# How long a probe connection waits to see whether QRS closes it (a refused certificate).
CERT_PROBE_S = 0.5
# How much of a script log's end is read: enough for any sensible monitor.log_tail_lines.
LOG_TAIL_BYTES = 256 * 1024
QUARTER_HOUR_S = 900.0  # time zones' offsets are whole quarter hours
# OpenSSL verification codes that get a hint of their own.
_HOSTNAME_MISMATCH = 62
_IP_MISMATCH = 64
_UNKNOWN_ISSUER = {2, 18, 19, 20, 21}
_EXPIRED = {9, 10}


def new_xrfkey() -> str:
    # 16 characters of 0-9a-f (within QRS's 0-9a-zA-Z) from one urandom call: drawing each
    # character with secrets.choice cost 4% of the daemon's time under load.
    return secrets.token_hex(8)


def qlik_user_header(settings: QrsSettings) -> str:
    directory = url_quote(settings.user_directory, safe="")
    return f"UserDirectory={directory}; UserId={url_quote(settings.user_id, safe='')}"


def tls_files(settings: QrsSettings) -> TlsFiles:
    return TlsFiles(
        ca_file=settings.ca_file,
        ca_key="qrs.ca_file",
        cert_file=settings.cert_file if settings.auth == "certificate" else None,
        key_file=settings.key_file if settings.auth == "certificate" else None,
        cert_key="qrs.cert_file",
        relax_strict_for_pinned_root=True,
        check_hostname=settings.verify_hostname,
        verify=not settings.insecure,
    )


def build_ssl_context(settings: QrsSettings) -> ssl.SSLContext:
    """Blocking (reads key files): call once, off the event loop."""
    return build_tls_context(tls_files(settings))


def verification_hint(code: int, settings: QrsSettings) -> str:
    """What to change when QRS's server certificate fails verification with OpenSSL `code`."""
    host = settings.server_name or urlsplit(settings.url).hostname or "?"
    if code in (_HOSTNAME_MISMATCH, _IP_MISMATCH):
        return (
            f"the certificate does not name {host!r} (Sense's certificates name the node's host"
            " name): set qrs.server_name to the name it holds, or qrs.verify_hostname: false"
            " to verify the chain only"
        )
    if code in _UNKNOWN_ISSUER:
        return (
            "the certificate is not signed by qrs.ca_file: set it to the root.pem exported"
            " from the QMC together with the client certificate"
        )
    if code in _EXPIRED:
        return "the certificate has expired or is not valid yet: check both machines' clocks"
    return (
        "set qrs.ca_file to Sense's root.pem (strict X.509 checks are off for a pinned root);"
        " qrs.insecure: true turns verification off altogether, as a last resort"
    )


@dataclass
class _Token:
    """The bearer JWT, and where it came from (re-read when the file changes)."""

    value: str
    path: Path | None = None
    mtime: float = 0.0
    checked: float = 0.0
    warned: float = float("-inf")


def _read_token(path: Path) -> tuple[str, float]:
    return path.read_text("utf-8").strip(), path.stat().st_mtime


class QrsClient:
    """The QRS API operations over the shared transport (transport.py).

    `await client.start()` once, then the operations; `await client.close()` at the end.
    """

    site = "qrs"
    unsupported = frozenset({SelectorKind.SPACE})

    def __init__(
        self,
        settings: QrsSettings,
        *,
        observer: Observer | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._clock = clock
        # Held by the one call that opens a proxy session, so that calls in parallel do not
        # each open a session of their own (Sense allows a user about five).
        self._proxy_session_lock = asyncio.Lock()
        self._token: _Token | None = None
        self._base = f"{settings.url}/qrs/"
        # How QRS reads a date in a filter, measured by `calibrate_dates` (seconds to add to a
        # UTC moment so that QRS reads it as that moment; 0 for a server that reads UTC).
        self.date_offset_s = 0.0
        self._date_note = "not measured yet"
        self.transport = Transport(
            "QRS",
            settings.url,
            tls_files(settings),
            timeout_s=settings.timeout_s,
            max_concurrency=settings.max_concurrency,
            retry=settings.retry,
            headers={"X-Qlik-User": qlik_user_header(settings), "Accept": "application/json"},
            server_hostname=settings.server_name,
            observer=observer,
            rng=rng,
            inspect=self._refuse_login_answers,
            explain_disconnect=self._explain_disconnect,
            certificate_hint=lambda error: verification_hint(
                int(getattr(error, "verify_code", 0) or 0), settings
            ),
        )

    @property
    def last_success(self) -> float | None:
        """Monotonic time of the last call QRS answered."""
        return self.transport.last_success

    async def start(self) -> None:
        """Load certificates and the token (ConfigError when they cannot be used)."""
        if self.settings.auth == "jwt":
            self._token = await self._load_token()
        await self.transport.start()

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> QrsClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the bearer token -----------------------------------------------------------------------

    async def _load_token(self) -> _Token:
        path = self.settings.jwt_file
        if path is None:
            assert self.settings.jwt is not None  # the settings' validator makes sure
            token = _Token(self.settings.jwt.get_secret_value())
        else:
            try:
                value, mtime = await asyncio.to_thread(_read_token, path)
            except OSError as exc:
                raise ConfigError.unusable("qrs.jwt_file", path, exc) from None
            token = _Token(value, path, mtime)
        token.checked = time.monotonic()
        self._warn_expiry(token)
        return token

    def _warn_expiry(self, token: _Token) -> None:
        warning = expiry_warning(token_expiry(token.value), self._clock())
        if warning is not None and time.monotonic() - token.warned >= EXPIRY_WARN_EVERY_S:
            token.warned = time.monotonic()
            logger.warning(warning)

    async def _current_token(self) -> str:
        token = self._token
        assert token is not None
        if time.monotonic() - token.checked < TOKEN_CHECK_S:
            return token.value
        token.checked = time.monotonic()
        self._warn_expiry(token)
        if token.path is not None:
            try:
                mtime = (await asyncio.to_thread(token.path.stat)).st_mtime
                if mtime != token.mtime:
                    self._token = await self._load_token()
                    # A new token may be another user: its proxy session starts afresh.
                    self.transport.cookies.clear()
                    logger.info("qrs.jwt_file changed: using the new token")
            except (OSError, ConfigError) as exc:
                logger.warning("qrs.jwt_file {}: keeping the current token ({})", token.path, exc)
        return self._token.value if self._token is not None else token.value

    def _needs_proxy_session(self) -> bool:
        """Whether no proxy session is open yet: the name of the proxy's cookie is the
        admin's choice (`qrs.session_cookie`); without it, any cookie the proxy set counts."""
        if self.settings.auth != "jwt":
            return False
        wanted = self.settings.session_cookie
        return not any(wanted is None or c.key == wanted for c in self.transport.cookies)

    # -- transport ---------------------------------------------------------------------------

    def _url(self, path: str, params: Mapping[str, str], xrfkey: str) -> URL:
        query = "".join(f"{k}={url_quote(v, safe='')}&" for k, v in params.items())
        return URL(f"{self._base}{path}?{query}xrfkey={xrfkey}", encoded=True)

    async def _explain_disconnect(self, path: str) -> QrsAuthError | None:
        # A probe tells a refused certificate from a dropped connection; disconnects are
        # rare, so it costs nothing in the common case (a request trace would, on every call).
        if self.settings.auth == "certificate" and await self._certificate_refused():
            return QrsAuthError(
                f"QRS {self.settings.url} closed a new connection without answering: it"
                " does not accept the client certificate (qrs.cert_file, qrs.key_file);"
                " export client.pem, client_key.pem and root.pem again from the QMC",
                path=path,
            )
        return None

    async def _certificate_refused(self) -> bool:
        """Whether QRS refuses the client certificate.

        With TLS 1.3 the server checks the client certificate after the handshake, and a
        server that refuses it closes the connection (or sends an alert) before any answer;
        to the HTTP client that is a plain disconnect. A second connection that sends
        nothing tells the two apart: a refusing server closes it at once, an accepting one
        waits for a request.
        """
        parts = urlsplit(self.settings.url)
        context = self.transport.ssl_context
        if context is None or parts.scheme != "https":
            return False
        host = parts.hostname or ""
        port = parts.port or 443
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=context, server_hostname=self.settings.server_name or host
                ),
                self.settings.timeout_s,
            )
        except (OSError, ssl.SSLError, TimeoutError):
            return False
        try:
            return await asyncio.wait_for(reader.read(1), CERT_PROBE_S) == b""
        except TimeoutError:
            return False
        except (OSError, ssl.SSLError):
            return True  # an alert: the handshake was refused
        finally:
            writer.close()

    def _refuse_login_answers(self, method: str, path: str, response: Answer) -> None:
        """A redirect, or an HTML page where JSON was asked for, is a proxy's login: the
        token (or the header) was not accepted."""
        if 300 <= response.status < 400:
            where = response.headers.get("Location", "?")
            why = f"redirected to {where}"
        elif response.content_type == "text/html":
            why = f"answered with an HTML page (HTTP {response.status})"
        else:
            return
        hint = (
            "the virtual proxy did not accept the JWT: check qrs.jwt, its expiry, and the"
            " proxy's JWT settings"
            if self.settings.auth == "jwt"
            else "qrs.url should be the QRS port (https://host:4242) or a virtual proxy"
        )
        raise QrsAuthError(
            f"QRS {method} /qrs/{path} was {why}: {hint}",
            status=response.status,
            path=path,
        )

    async def _call(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        *,
        repeatable: bool = True,
        tail_bytes: int = 0,
    ) -> tuple[int, str]:
        """(status, text) of a 2xx answer, after retries; raises a QrsError otherwise.

        `repeatable=False` (a start): re-sent only when the request provably never left;
        any other failure raises QrsAnswerLost at once. `tail_bytes`: keep only the end of
        the answer (a script log can be megabytes).
        """
        query = params or {}

        async def prepare() -> Prepared:
            xrfkey = new_xrfkey()
            headers = {"X-Qlik-Xrfkey": xrfkey}
            if self._token is not None:
                headers["Authorization"] = f"Bearer {await self._current_token()}"
            return Prepared(self._url(path, query, xrfkey), headers)

        kwargs: dict[str, Any] = {
            "path": path,
            "operation": f"{method} {path.split('/')[0]}",
            "what": f"QRS {method} /qrs/{path}",
            "body": body,
            "repeatable": repeatable,
            "tail_bytes": tail_bytes,
        }
        if self._needs_proxy_session():
            async with self._proxy_session_lock:
                answer = await self.transport.call(method, prepare, **kwargs)
        else:
            answer = await self.transport.call(method, prepare, **kwargs)
        status, text = answer.status, answer.text
        if status in (401, 403):
            raise QrsAuthError(
                f"QRS refused {method} /qrs/{path}: HTTP {status} {text[:200]}",
                status=status,
                path=path,
                detail=text[:200],
            )
        if status >= 400:
            raise QrsRequestError(
                f"QRS answered {method} /qrs/{path} with HTTP {status}: {text[:200]}",
                status=status,
                path=path,
                detail=text[:200],
            )
        return status, text

    async def _json(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        *,
        repeatable: bool = True,
    ) -> Any:
        status, text = await self._call(method, path, params, body, repeatable=repeatable)
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:
            raise QrsRequestError(
                f"QRS answered /qrs/{path} with invalid JSON", status=status, path=path
            ) from None

    # -- operations --------------------------------------------------------------------------

    async def about(self) -> dict[str, Any]:
        data = await self._json("GET", "about")
        return data if isinstance(data, dict) else {}

    async def task_count(self) -> int | None:
        data = await self._json("GET", "task/count")
        value = data.get("value") if isinstance(data, dict) else None
        return value if isinstance(value, int) else None

    async def find_tasks(self, selectors: Sequence[Selector]) -> list[TaskRef]:
        """Candidate tasks for `selectors`: one query per chunk of selectors, not per task."""
        found: dict[str, TaskRef] = {}
        for text in task_filters(selectors):
            data = await self._json("GET", "task/full", {"filter": text})
            for task in self._tasks(data):
                found.setdefault(task.id, task)
        return list(found.values())

    @staticmethod
    def _tasks(data: Any) -> list[TaskRef]:
        """Tasks from a QRS list answer; anything that is not a task with a GUID is passed over."""
        items = data if isinstance(data, list) else []
        return [t for t in (parse_task(i) for i in items if isinstance(i, dict)) if t is not None]

    async def all_tasks(self) -> list[TaskRef]:
        return self._tasks(await self._json("GET", "task/full"))

    async def task(self, task_id: str) -> TaskRef | None:
        """The task's current state (tags, enabled, last execution), None when it is unknown."""
        tasks = await self.find_tasks([Selector(SelectorKind.ID, task_id)])
        return tasks[0] if tasks else None

    async def start_task(self, task: TaskRef, options: ReloadOptions | None = None) -> StartResult:
        """Start `task` (as read before the start) and say what became of it.

        Never sends a start twice when the first may have reached QRS: a lost answer or a
        declined start (the empty GUID) is followed by a re-read of the task.
        """
        path = f"task/{task.id}/start/synchronous"
        try:
            data = await self._json("POST", path, repeatable=False)
        except QrsAnswerLost as exc:
            return await self._after_lost_start(task, str(exc))
        except (QrsRequestError, QrsAuthError) as exc:
            if exc.status is None or not exc.detail:
                # Refused before or without a text of QRS's own (TLS, a proxy's login page):
                # the message says why and what to change.
                return StartResult(TaskResult.FAILED, error=str(exc))
            return StartResult(
                TaskResult.FAILED,
                error=f"QRS refused to start this {task.type_name} task:"
                f" HTTP {exc.status} {exc.detail}".rstrip(),
            )
        except QrsError as exc:
            return StartResult(TaskResult.FAILED, error=str(exc))
        value = data.get("value") if isinstance(data, dict) else None
        session = normalize_guid(value) if isinstance(value, str) else None
        if session is not None and session != EMPTY_GUID:
            return StartResult(TaskResult.STARTED, execution_id=session)
        try:
            now = await self.task(task.id)
        except QrsError as exc:
            return StartResult(
                TaskResult.NOT_STARTED,
                error=f"QRS did not start the task, and re-reading it failed: {exc}",
            )
        return explain_declined(now)

    async def _after_lost_start(self, before: TaskRef, why: str) -> StartResult:
        try:
            now = await self.task(before.id)
            result_id = run_after(before, now)
            if result_id is None:
                return lost_unknown(why)
            found = await self._executions({"filter": result_filter(result_id)})
        except QrsError as exc:
            return lost_unknown(f"{why}; re-reading the task failed: {exc}")
        execution_id = next((e.execution_id for e in found if e.execution_id), None)
        if execution_id is None:
            return StartResult(
                TaskResult.STARTED,
                error="the answer to the start was lost; a run began after it, but its"
                " execution id cannot be read",
            )
        logger.info(
            "the answer to starting task {} was lost ({}); it runs as execution {}",
            before.id,
            why,
            execution_id,
        )
        return StartResult(TaskResult.STARTED, execution_id=execution_id)

    async def _executions(self, params: Mapping[str, str]) -> list[Execution]:
        # Only /full carries task, execution, status and details: the plain list is condensed.
        data = await self._json("GET", "executionresult/full", params)
        items = data if isinstance(data, list) else []
        return [parse_execution(i) for i in items if isinstance(i, dict)]

    async def execution_results(self, execution_id: str) -> list[Execution]:
        return await self._executions({"filter": execution_filter(execution_id)})

    async def executions_of(self, execution_ids: Sequence[str]) -> list[Execution]:
        """Every attempt of every given execution: one query per chunk of ids."""
        found: list[Execution] = []
        for text in executions_filters(execution_ids):
            found += await self._executions({"filter": text})
        return found

    async def changed_executions(self, since: str) -> list[Execution]:
        return await self._executions({"filter": changed_filter(self._as_read(since))})

    def _as_read(self, moment: str) -> str:
        """`moment` (UTC) written so that QRS reads it as that moment (`calibrate_dates`)."""
        if not self.date_offset_s:
            return moment
        parsed = parse_iso(moment)
        return moment if parsed is None else iso(parsed + timedelta(seconds=self.date_offset_s))

    @property
    def date_note(self) -> str:
        return self._date_note

    async def calibrate_dates(self) -> bool:
        """Learn how QRS reads a date in a filter (qrs-api.md section 6: as UTC, or as the
        server's local time) and correct for it; what was found, in words.

        A known result is asked for by its own `modifiedDate`: a server that reads UTC returns
        it. Else, and to find a server east of UTC (which returns it, and more), the latest
        moment that still returns it is sought among the offsets time zones have (quarter
        hours from -12 h to +14 h): that is the server's offset. False when there was no
        run to measure against (dates are then sent as UTC).
        """
        known = await self._known_result()
        if known is None:
            self._date_note = "no run in the last day to measure against: dates are sent as UTC"
            return False
        moment = parse_iso(known.modified)
        assert moment is not None

        async def returned(offset_s: float) -> bool:
            literal = iso(moment + timedelta(seconds=offset_s))
            found = await self._executions(
                {"filter": f"id eq {known.result_id} and modifiedDate ge '{literal}'"}
            )
            return any(r.result_id == known.result_id for r in found)

        quarters = range(-12 * 4, 14 * 4 + 1)
        if await returned(0) and not await returned(QUARTER_HOUR_S):
            offset = 0.0
        else:
            low, high = 0, len(quarters) - 1  # the last quarter that still returns it
            if not await returned(quarters[low] * QUARTER_HOUR_S):
                self._date_note = "QRS did not return a known run by its own date: sent as UTC"
                logger.warning("QRS date filter: {}", self._date_note)
                return False
            while low < high:
                middle = (low + high + 1) // 2
                if await returned(quarters[middle] * QUARTER_HOUR_S):
                    low = middle
                else:
                    high = middle - 1
            offset = quarters[low] * QUARTER_HOUR_S
        self.date_offset_s = offset
        if offset:
            self._date_note = (
                f"QRS reads filter dates as its local time (UTC{offset / 3600:+g} h): corrected for"
            )
            logger.warning("QRS date filter: {}", self._date_note)
        else:
            self._date_note = "QRS reads filter dates as UTC"
            logger.info("QRS date filter: {}", self._date_note)
        return True

    async def _known_result(self) -> Execution | None:
        """The newest result changed in the last hour, else the last day (read as UTC: a
        server west of UTC returns less, which the wider window makes up for)."""
        now = datetime.now(UTC)
        for back in (timedelta(hours=1), timedelta(days=1)):
            found = [
                r
                for r in await self._executions({"filter": changed_filter(iso(now - back))})
                if r.result_id and parse_iso(r.modified) is not None
            ]
            if found:
                return max(found, key=lambda r: (parse_iso(r.modified), r.result_id))
        return None

    async def script_log_tail(self, task: TaskRef, execution: Execution, lines: int) -> str | None:
        """The last `lines` lines of the attempt's script log; None when it has none (not a
        reload); LogNotReady when QRS has not written it yet (try again later).

        The call of May 2025 first (by result id); a server without it (any 4xx but 401 and
        403, or a 5xx after the retries) gets the older call (by file reference).
        """
        if task.task_type != 0:
            return None  # only reloads write a script log
        download = await self._log_download(
            f"reloadtask/{task.id}/scriptlogfile", {"executionResultId": execution.result_id}
        )
        if download is None and execution.file_reference_id:
            download = await self._log_download(
                f"reloadtask/{task.id}/scriptlog", {"fileReferenceId": execution.file_reference_id}
            )
        if download is None:
            raise LogNotReady(f"QRS has no script log for result {execution.result_id} yet")
        file_name = re.sub(r"[^0-9A-Za-z_-]+", "_", task.name)[:100] or "script"
        try:
            _, text = await self._call(
                "GET", f"download/reloadtask/{download}/{file_name}.log", tail_bytes=LOG_TAIL_BYTES
            )
        except QrsRequestError as exc:
            if exc.status == 404:
                raise LogNotReady(f"the script log download answered 404: {exc}") from None
            raise
        tail = log_tail(text, lines)
        if not tail:
            raise LogNotReady(f"the script log of result {execution.result_id} is empty so far")
        return tail

    async def _log_download(self, path: str, params: Mapping[str, str]) -> str | None:
        """The download id a log call gives (`{"value": id}` or a bare JSON string); None when
        this call cannot give it (a server without the call, or no log under that key)."""
        try:
            data = await self._json("GET", path, params)
        except QrsAuthError:
            raise
        except (QrsRequestError, QrsUnavailable) as exc:
            logger.debug("QRS {}: {}; trying the other script log call", path, exc)
            return None
        value = data.get("value") if isinstance(data, dict) else data
        return normalize_guid(value) if isinstance(value, str) else None

    async def execution_alive(self, execution_id: str) -> bool:
        """Whether the execution session still exists (QRS deletes it at the end)."""
        guid = normalize_guid(execution_id)
        if guid is None:
            raise ValueError(f"not a GUID: {execution_id!r}")
        try:
            await self._call("GET", f"executionsession/{guid}")
        except QrsRequestError as exc:
            if exc.status == 404:
                return False
            raise
        return True
