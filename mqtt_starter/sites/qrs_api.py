"""QRS's access rules over the shared transport (sites/http.py): a fresh xrfkey for every call
(query and header), the X-Qlik-User header (values URL-encoded), and either the client
certificate (port 4242) or a bearer JWT (virtual proxy, whose session cookie is kept under any
name, also for IP hosts). Redirects are never followed: from a proxy, a redirect or an HTML page
means the token was refused. A dropped connection is told from a refused client certificate by
a probe. `call` answers a 2xx or raises the QrsError that fits.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote as url_quote
from urllib.parse import urlsplit

from yarl import URL

from mqtt_starter.config import QrsSettings
from mqtt_starter.core.errors import (
    QrsAuthError,
    QrsRequestError,
)
from mqtt_starter.core.qrs_query import percent_encode
from mqtt_starter.sites.http import Answer, Observer, Prepared, TlsFiles, Transport
from mqtt_starter.sites.http import build_ssl_context as build_tls_context
from mqtt_starter.sites.qrs_token import JwtSource

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


def new_xrfkey(rng: random.Random) -> str:
    """16 characters of 0-9a-f (within QRS's 0-9a-zA-Z).

    The key guards browsers against cross-site requests; this client is no browser, and the
    key is seen only by QRS. So a generator seeded from the OS once per client will do: a
    system random call for each key cost 1.5% of the daemon's time under load."""
    return f"{rng.getrandbits(64):016x}"


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


class QrsApi:
    """Calls to QRS: `await api.start()` once, then `call`/`json`; `close()` at the end."""

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
        # The bearer JWT of a virtual proxy (auth: jwt); a new one drops the proxy session.
        self.jwt = (
            JwtSource(settings, clock, on_change=lambda: self.transport.cookies.clear())
            if settings.auth == "jwt"
            else None
        )
        # Parsed once: each call's URL is built from its parts, not parsed again (1 µs).
        self._base = URL(f"{settings.url}/qrs/")
        self._keys = random.Random(secrets.token_bytes(32))
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
        if self.jwt is not None:
            await self.jwt.load()
        await self.transport.start()

    async def close(self) -> None:
        await self.transport.close()

    def _needs_proxy_session(self) -> bool:
        """Whether no proxy session is open yet: the name of the proxy's cookie is the
        admin's choice (`qrs.session_cookie`); without it, any cookie the proxy set counts."""
        if self.settings.auth != "jwt":
            return False
        wanted = self.settings.session_cookie
        return not any(wanted is None or c.key == wanted for c in self.transport.cookies)

    # -- transport ---------------------------------------------------------------------------

    def _url(self, path: str, params: Mapping[str, str], xrfkey: str) -> URL:
        query = "".join(f"{k}={percent_encode(v)}&" for k, v in params.items())
        base = self._base
        return URL.build(
            scheme=base.scheme,
            authority=base.raw_authority,
            path=base.raw_path + path,
            query_string=f"{query}xrfkey={xrfkey}",
            encoded=True,
        )

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

    async def call(
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

        def prepare() -> Prepared | Awaitable[Prepared]:
            xrfkey = new_xrfkey(self._keys)
            headers = {"X-Qlik-Xrfkey": xrfkey}
            url = self._url(path, query, xrfkey)
            if self.jwt is None:
                return Prepared(url, headers)  # no await: the common case costs no coroutine
            return self._with_jwt(url, headers)

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

    async def _with_jwt(self, url: URL, headers: dict[str, str]) -> Prepared:
        assert self.jwt is not None
        headers["Authorization"] = f"Bearer {await self.jwt.current()}"
        return Prepared(url, headers)

    async def json(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        *,
        repeatable: bool = True,
    ) -> Any:
        status, text = await self.call(method, path, params, body, repeatable=repeatable)
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:
            raise QrsRequestError(
                f"QRS answered /qrs/{path} with invalid JSON", status=status, path=path
            ) from None
