"""The QRS client: the only module that imports the HTTP client library.

One aiohttp session and connection pool; every call gets a fresh xrfkey (query and header),
the X-Qlik-User header (values URL-encoded), and either the client certificate (port 4242) or a
bearer JWT (virtual proxy, whose session cookie is kept, also for IP hosts). At most
`max_concurrency` calls are in flight. Redirects are never followed: from a proxy, a redirect
or an HTML page means the token was refused.

Retries: a call that is safe to repeat is retried on connection errors, timeouts and 5xx with
full-jitter exponential backoff; 4xx never are. A start is not safe to repeat: it is re-sent
only when it provably never left (the connection could not be made); otherwise its answer is
lost (QrsAnswerLost), and `start_task` re-reads the task instead. aiohttp and ssl errors become
QrsError subclasses here and nowhere else.
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
from pathlib import Path
from typing import Any
from urllib.parse import quote as url_quote
from urllib.parse import urlsplit

import aiohttp
from loguru import logger
from yarl import URL

from .config import QrsSettings
from .core.errors import (
    ConfigError,
    QrsAnswerLost,
    QrsAuthError,
    QrsError,
    QrsRequestError,
)
from .core.model import (
    Execution,
    ReloadOptions,
    Selector,
    SelectorKind,
    StartResult,
    TaskRef,
    TaskResult,
)
from .core.monitoring import log_tail
from .core.qrs_query import (
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
from .core.start_check import explain_declined, lost_unknown, run_after
from .core.tokens import expiry_warning, token_expiry
from .retries import Retryable, back_off

# Called after each QRS call with (operation, seconds, HTTP status or 0 when none came back).
Observer = Callable[[str, float, int], None]

# How often a jwt_file is looked at for a new token, and a near expiry warned about again.
TOKEN_CHECK_S = 2.0
EXPIRY_WARN_EVERY_S = 3600.0
# How long a probe connection waits to see whether QRS closes it (a refused certificate).
CERT_PROBE_S = 0.5
# How much of a script log's end is read: enough for any sensible monitor.log_tail_lines.
LOG_TAIL_BYTES = 256 * 1024
# OpenSSL verification codes that get a hint of their own.
_HOSTNAME_MISMATCH = 62
_IP_MISMATCH = 64
_UNKNOWN_ISSUER = {2, 18, 19, 20, 21}
_EXPIRED = {9, 10}


async def _read_tail(response: aiohttp.ClientResponse, limit: int) -> str:
    """The last `limit` bytes of a body, read in chunks: memory stays bounded."""
    kept = bytearray()
    cut = False
    async for chunk in response.content.iter_chunked(65536):
        kept += chunk
        if len(kept) > limit:
            del kept[: len(kept) - limit]
            cut = True
    text = kept.decode(response.get_encoding() or "utf-8", errors="replace")
    return text.split("\n", 1)[-1] if cut else text  # a cut line is no line


def new_xrfkey() -> str:
    # 16 characters of 0-9a-f (within QRS's 0-9a-zA-Z) from one urandom call: drawing each
    # character with secrets.choice cost 4% of the daemon's time under load.
    return secrets.token_hex(8)


def qlik_user_header(settings: QrsSettings) -> str:
    directory = url_quote(settings.user_directory, safe="")
    return f"UserDirectory={directory}; UserId={url_quote(settings.user_id, safe='')}"


def build_ssl_context(settings: QrsSettings) -> ssl.SSLContext:
    """Blocking (reads key files): call once, off the event loop.

    An unreadable or corrupt file is a ConfigError that names its key: retrying cannot help.
    """
    try:
        context = ssl.create_default_context(
            cafile=str(settings.ca_file) if settings.ca_file else None
        )
    except OSError as exc:
        raise ConfigError.unusable("qrs.ca_file", settings.ca_file, exc) from None
    if settings.ca_file is not None:
        # Sense's own CA and server certificates fail the strict X.509 checks that Python 3.13
        # turns on by default; for a root pinned by hand they add nothing, so they are off.
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    if settings.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif not settings.verify_hostname:
        # The chain is still verified against ca_file; only the name is not compared.
        context.check_hostname = False
    if settings.auth == "certificate":
        try:
            context.load_cert_chain(settings.cert_file, settings.key_file)
        except OSError as exc:  # ssl.SSLError is one
            raise ConfigError.unusable(
                "qrs.cert_file", f"{settings.cert_file} (with {settings.key_file})", exc
            ) from None
    return context


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
    """`await client.start()` once, then the operations; `await client.close()` at the end."""

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
        self._observer = observer
        self._rng = rng or random.Random()
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._gate = asyncio.Semaphore(settings.max_concurrency)
        # Held by the one call that opens a proxy session, so that calls in parallel do not
        # each open a session of their own (Sense allows a user about five).
        self._proxy_session_lock = asyncio.Lock()
        self._token: _Token | None = None
        self._ssl_context: ssl.SSLContext | None = None
        self._base = f"{settings.url}/qrs/"
        self.last_success: float | None = None  # monotonic time of the last answered call

    async def start(self) -> None:
        """Load certificates and the token (ConfigError when they cannot be used)."""
        context = await asyncio.to_thread(build_ssl_context, self.settings)
        self._ssl_context = context
        if self.settings.auth == "jwt":
            self._token = await self._load_token()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=self.settings.max_concurrency),
            headers={"X-Qlik-User": qlik_user_header(self.settings), "Accept": "application/json"},
            # The proxy's session cookie must come back even when the URL names an IP address,
            # which aiohttp's default jar refuses.
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            raise_for_status=False,
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
                    assert self._session is not None
                    # A new token may be another user: its proxy session starts afresh.
                    self._session.cookie_jar.clear()
                    logger.info("qrs.jwt_file changed: using the new token")
            except (OSError, ConfigError) as exc:
                logger.warning("qrs.jwt_file {}: keeping the current token ({})", token.path, exc)
        return self._token.value if self._token is not None else token.value

    def _needs_proxy_session(self) -> bool:
        if self.settings.auth != "jwt" or self._session is None:
            return False
        return not any(c.key.startswith("X-Qlik-Session") for c in self._session.cookie_jar)

    # -- transport ---------------------------------------------------------------------------

    def _url(self, path: str, params: Mapping[str, str], xrfkey: str) -> URL:
        query = "".join(f"{k}={url_quote(v, safe='')}&" for k, v in params.items())
        return URL(f"{self._base}{path}?{query}xrfkey={xrfkey}", encoded=True)

    async def _once(
        self, method: str, path: str, params: Mapping[str, str], body: Any, tail_bytes: int
    ) -> tuple[int, str]:
        if self._needs_proxy_session():
            async with self._proxy_session_lock:
                if self._needs_proxy_session():
                    return await self._send(method, path, params, body, tail_bytes)
        return await self._send(method, path, params, body, tail_bytes)

    async def _send(
        self, method: str, path: str, params: Mapping[str, str], body: Any, tail_bytes: int = 0
    ) -> tuple[int, str]:
        if self._session is None:
            raise RuntimeError("QrsClient.start() was not called")
        xrfkey = new_xrfkey()
        headers = {"X-Qlik-Xrfkey": xrfkey}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {await self._current_token()}"
        try:
            async with (
                self._gate,
                self._session.request(
                    method,
                    self._url(path, params, xrfkey),
                    json=body,
                    headers=headers,
                    allow_redirects=False,
                    server_hostname=self.settings.server_name,
                ) as response,
            ):
                if tail_bytes and response.status < 300:
                    text = await _read_tail(response, tail_bytes)
                else:
                    text = await response.text()
                self._refuse_login_answers(method, path, response)
                return response.status, text
        except aiohttp.ClientConnectorCertificateError as exc:
            error = exc.certificate_error
            code = getattr(error, "verify_code", 0)
            message = getattr(error, "verify_message", error)
            raise QrsAuthError(
                f"TLS verification of {self.settings.url} failed: {message};"
                f" {verification_hint(code, self.settings)}",
                path=path,
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise QrsAuthError(
                f"TLS handshake with {self.settings.url} failed: {exc}", path=path
            ) from None
        except aiohttp.ClientConnectorError as exc:
            # No connection was made: nothing was sent.
            raise Retryable(f"{type(exc).__name__}: {exc}", never_sent=True) from None
        except aiohttp.ServerDisconnectedError as exc:
            # A probe tells a refused certificate from a dropped connection; disconnects are
            # rare, so it costs nothing in the common case (a request trace would, on every
            # call).
            if self.settings.auth == "certificate" and await self._certificate_refused():
                raise QrsAuthError(
                    f"QRS {self.settings.url} closed a new connection without answering: it"
                    " does not accept the client certificate (qrs.cert_file, qrs.key_file);"
                    " export client.pem, client_key.pem and root.pem again from the QMC",
                    path=path,
                ) from None
            raise Retryable(f"{type(exc).__name__}: {exc}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Retryable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None

    async def _certificate_refused(self) -> bool:
        """Whether QRS refuses the client certificate.

        With TLS 1.3 the server checks the client certificate after the handshake, and a
        server that refuses it closes the connection (or sends an alert) before any answer;
        to the HTTP client that is a plain disconnect. A second connection that sends
        nothing tells the two apart: a refusing server closes it at once, an accepting one
        waits for a request.
        """
        parts = urlsplit(self.settings.url)
        if self._ssl_context is None or parts.scheme != "https":
            return False
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host,
                    port,
                    ssl=self._ssl_context,
                    server_hostname=self.settings.server_name or host,
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

    def _refuse_login_answers(
        self, method: str, path: str, response: aiohttp.ClientResponse
    ) -> None:
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
        params = params or {}
        retry = self.settings.retry
        operation = f"{method} {path.split('/')[0]}"
        for attempt in range(1, retry.attempts + 1):
            started = time.monotonic()
            status = 0
            try:
                status, text = await self._once(method, path, params, body, tail_bytes)
                if status >= 500:
                    raise Retryable(f"HTTP {status}: {text[:200]}", status)
            except Retryable as exc:
                await back_off(
                    exc,
                    what=f"QRS {method} /qrs/{path}",
                    path=path,
                    attempt=attempt,
                    retry=retry,
                    repeatable=repeatable,
                    rng=self._rng,
                )
                continue
            finally:
                if self._observer is not None:
                    self._observer(operation, time.monotonic() - started, status)
            self.last_success = time.monotonic()
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
        raise AssertionError("unreachable: retry.attempts >= 1")

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
        return await self._executions({"filter": changed_filter(since)})

    async def script_log_tail(self, task: TaskRef, execution: Execution, lines: int) -> str | None:
        """The last `lines` lines of the attempt's script log; None when it has none.

        The call of May 2025 first (by result id); a server that does not know it answers
        404, and the older call (by file reference) is tried.
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
            return None
        file_name = re.sub(r"[^0-9A-Za-z_-]+", "_", task.name)[:100] or "script"
        _, text = await self._call(
            "GET", f"download/reloadtask/{download}/{file_name}.log", tail_bytes=LOG_TAIL_BYTES
        )
        return log_tail(text, lines)

    async def _log_download(self, path: str, params: Mapping[str, str]) -> str | None:
        try:
            data = await self._json("GET", path, params)
        except QrsRequestError as exc:
            if exc.status in (400, 404):
                return None
            raise
        value = data.get("value") if isinstance(data, dict) else None
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
