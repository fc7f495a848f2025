"""One HTTP transport for both sites (QRS and Qlik Cloud): what a site client needs below its
API operations, written once.

Lives here: the TLS context (built off the event loop; any problem with a certificate file is a
ConfigError naming its key), the aiohttp session, the retry loop (jittered exponential backoff
on connection errors, timeouts and 5xx; a call that is not repeatable is re-sent only when it
provably never left), the translation of aiohttp and ssl errors into the QrsError tree, reading
only the tail of a long body in any charset, a bearer token shared by every call with one
renewal for any number of concurrent 401s, and rate-limit waits that are bounded.
Never here: what a path means, or how a site's answers are read (the site clients do that).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from loguru import logger
from yarl import URL

from mqtt_starter.config import RetrySettings
from mqtt_starter.core.errors import ConfigError, QrsAnswerLost, QrsAuthError, QrsUnavailable

# Called after each call with (operation, seconds, HTTP status or 0 when none came back).
Observer = Callable[[str, float, int], None]
CHUNK = 65536


class Retryable(Exception):
    """A failed attempt that another attempt may mend."""

    def __init__(self, message: str, status: int = 0, *, never_sent: bool = False) -> None:
        self.status = status
        # True when the connection could not be made: the request provably never left.
        self.never_sent = never_sent
        super().__init__(message)


async def back_off(
    exc: Retryable,
    *,
    what: str,
    path: str,
    attempt: int,
    retry: RetrySettings,
    repeatable: bool,
    rng: random.Random,
) -> None:
    """Wait before attempt `attempt + 1` of `what` (e.g. "QRS GET /qrs/about"), or raise:
    QrsAnswerLost for a call that must not be repeated, QrsUnavailable after the last try."""
    if not repeatable and not exc.never_sent:
        raise QrsAnswerLost(f"{what}: {exc}", status=exc.status or None, path=path) from None
    if attempt >= retry.attempts:
        raise QrsUnavailable(
            f"{what} failed after {attempt} attempt(s): {exc}",
            status=exc.status or None,
            path=path,
        ) from None
    ceiling = min(retry.max_backoff_s, retry.backoff_s * 2 ** (attempt - 1))
    await asyncio.sleep(rng.uniform(0, ceiling))


# -- TLS ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """The certificate files of a site, each with the configuration key that names it."""

    ca_file: Path | None
    ca_key: str
    cert_file: Path | None = None
    key_file: Path | None = None
    cert_key: str = ""
    # Sense's own CA and server certificates fail the strict X.509 checks that Python 3.13
    # turns on by default; for a root pinned by hand they add nothing.
    relax_strict_for_pinned_root: bool = False
    check_hostname: bool = True
    verify: bool = True


def build_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """Blocking (reads the files): call once, off the event loop (`load_ssl_context`).

    An unreadable, corrupt or mismatched file is a ConfigError naming its key: no retry helps.
    """
    try:
        context = ssl.create_default_context(
            cafile=str(files.ca_file) if files.ca_file is not None else None
        )
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise _unusable(files.ca_key, files.ca_file, exc) from None
    if files.ca_file is not None and files.relax_strict_for_pinned_root:
        context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    if not files.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif not files.check_hostname:
        # The chain is still verified against ca_file; only the name is not compared.
        context.check_hostname = False
    if files.cert_file is not None:
        try:
            context.load_cert_chain(files.cert_file, files.key_file)
        except (OSError, ValueError) as exc:
            raise _unusable(
                files.cert_key, f"{files.cert_file} (with {files.key_file})", exc
            ) from None
    return context


def _unusable(key: str, path: object, exc: Exception) -> ConfigError:
    if isinstance(exc, OSError):
        return ConfigError.unusable(key, path, exc)
    return ConfigError.unusable(key, path, OSError(str(exc)))


async def load_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    return await asyncio.to_thread(build_ssl_context, files)


# -- bodies ---------------------------------------------------------------------------------------


def decode_body(data: bytes, charset: str | None) -> str:
    """Text of a body: the charset the answer names, else UTF-8 (what Qlik writes), without a
    leading byte-order mark; bytes that do not decode become U+FFFD, never an exception."""
    encoding = "utf-8"
    if charset:
        try:
            encoding = codecs.lookup(charset).name
        except LookupError:
            encoding = "utf-8"
    text = data.decode(encoding, errors="replace")
    return text.removeprefix("\ufeff")


async def read_tail(response: aiohttp.ClientResponse, limit: int) -> str:
    """The last `limit` bytes of a body as text, read in chunks: memory stays bounded. A line
    cut at the start is dropped (a cut line is no line)."""
    kept = bytearray()
    cut = False
    async for chunk in response.content.iter_chunked(CHUNK):
        kept += chunk
        if len(kept) > limit:
            del kept[: len(kept) - limit]
            cut = True
    text = decode_body(bytes(kept), response.charset)
    return text.split("\n", 1)[-1] if cut else text


@dataclass(frozen=True)
class Answer:
    """What a site answered: status, text, headers and the media type."""

    status: int
    text: str
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = ""

    def json(self) -> Any:
        """The body as JSON; the text itself when it is not JSON (an HTML page, plain text)."""
        if not self.text:
            return None
        try:
            return json.loads(self.text)
        except ValueError:
            return self.text


# -- tokens ---------------------------------------------------------------------------------------


class SharedToken:
    """A bearer token that every call shares. When calls find it refused (401) at the same
    moment, one of them fetches a new one and the others use it: any number of concurrent
    401s make one token request."""

    def __init__(
        self,
        fetch: Callable[[], Awaitable[tuple[str, float]]],
        *,
        clock: Callable[[], float] = time.monotonic,
        margin_s: float = 60.0,
    ) -> None:
        """`fetch` returns (token, lifetime in seconds); a token is fetched again `margin_s`
        (at most a tenth of its lifetime) before it expires."""
        self._fetch = fetch
        self._clock = clock
        self._margin = margin_s
        self._token: str | None = None
        self._expiry = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def get(self) -> str:
        token = self._token
        if token is not None and self._clock() < self._expiry:
            return token
        return await self.renew(token)

    async def renew(self, refused: str | None) -> str:
        """A new token unless another call replaced `refused` already."""
        async with self._lock:
            if self._token is not None and self._token != refused and self._clock() < self._expiry:
                return self._token
            token, lifetime = await self._fetch()
            self.fetches += 1
            self._token = token
            self._expiry = self._clock() + lifetime - min(self._margin, lifetime / 10)
            return token


# -- the transport --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """One attempt's URL and headers (a QRS xrfkey is new for every attempt)."""

    url: URL | str
    headers: Mapping[str, str]
    params: Mapping[str, str] | None = None


# Answers that a site client turns into an error before the retry loop looks at the status
# (a proxy's login page): (method, path, answer); raise a QrsError from it.
Inspect = Callable[[str, str, "Answer"], None]
# How long a rate-limited answer asks to wait (None: it is not a rate limit).
RateLimit = Callable[[Answer], float | None]


class Transport:
    """The session, TLS, retries, error mapping and bearer renewal of one site.

    `await transport.start()` once (ConfigError when the TLS files cannot be used), then
    `call(...)`, and `close()` at the end.
    """

    def __init__(
        self,
        site: str,
        address: str,
        tls: TlsFiles,
        *,
        timeout_s: float,
        max_concurrency: int,
        retry: RetrySettings,
        headers: Mapping[str, str] | None = None,
        trust_env: bool = False,
        server_hostname: str | None = None,
        observer: Observer | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        token: SharedToken | None = None,
        rate_limit: RateLimit | None = None,
        inspect: Inspect | None = None,
        explain_disconnect: Callable[[str], Awaitable[QrsAuthError | None]] | None = None,
        certificate_hint: Callable[[BaseException], str] | None = None,
    ) -> None:
        """`site` names the site in messages ("QRS", "Qlik Cloud"), `address` its URL;
        `token`: a bearer sent with every call and renewed once on a 401; `rate_limit`:
        which answers ask to wait (bounded by `retry.max_backoff_s` in all);
        `explain_disconnect`: what a dropped
        connection means (a refused client certificate), asked before retrying;
        `certificate_hint`: what to change when the server's certificate fails verification."""
        self.site = site
        self.address = address
        self.tls = tls
        self.retry = retry
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self._headers = dict(headers or {})
        self._trust_env = trust_env
        self._server_hostname = server_hostname
        self._observer = observer
        self._rng = rng or random.Random()
        self._clock = clock
        self.token = token
        self._rate_limit = rate_limit
        self._inspect = inspect
        self._explain_disconnect = explain_disconnect
        self._certificate_hint = certificate_hint
        self._session: aiohttp.ClientSession | None = None
        self._gate = asyncio.Semaphore(max_concurrency)
        self.ssl_context: ssl.SSLContext | None = None
        self.last_success: float | None = None  # monotonic time of the last answered call
        self.on_rate_limit: Callable[[float], None] | None = None

    async def start(self) -> None:
        self.ssl_context = await load_ssl_context(self.tls)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl_context, limit=self.max_concurrency),
            headers=self._headers,
            # A proxy's session cookie must come back even when the URL names an IP address,
            # which aiohttp's default jar refuses.
            cookie_jar=aiohttp.CookieJar(unsafe=True),
            raise_for_status=False,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            trust_env=self._trust_env,  # HTTPS_PROXY, NO_PROXY
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def cookies(self) -> aiohttp.abc.AbstractCookieJar:
        if self._session is None:
            raise RuntimeError(f"{self.site} transport: start() was not called")
        return self._session.cookie_jar

    async def send(
        self,
        method: str,
        prepared: Prepared,
        *,
        path: str,
        body: Any = None,
        tail_bytes: int = 0,
    ) -> Answer:
        """One attempt; aiohttp and ssl errors become Retryable or QrsAuthError here."""
        if self._session is None:
            raise RuntimeError(f"{self.site} transport: start() was not called")
        try:
            async with (
                self._gate,
                self._session.request(
                    method,
                    prepared.url,
                    params=prepared.params,
                    json=body,
                    headers=prepared.headers,
                    allow_redirects=False,
                    server_hostname=self._server_hostname,
                ) as response,
            ):
                if tail_bytes and response.status < 300:
                    text = await read_tail(response, tail_bytes)
                else:
                    text = decode_body(await response.read(), response.charset)
                answer = Answer(response.status, text, response.headers, response.content_type)
            if self._inspect is not None:
                self._inspect(method, path, answer)
            return answer
        except aiohttp.ClientConnectorCertificateError as exc:
            error = exc.certificate_error
            message = getattr(error, "verify_message", None) or error
            hint = f"; {self._certificate_hint(error)}" if self._certificate_hint else ""
            raise QrsAuthError(
                f"TLS verification of {self.address} failed: {message}{hint}", path=path
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise QrsAuthError(
                f"TLS handshake with {self.address} failed: {exc}", path=path
            ) from None
        except aiohttp.ClientConnectorError as exc:
            # No connection was made: nothing was sent.
            raise Retryable(f"{type(exc).__name__}: {exc}", never_sent=True) from None
        except aiohttp.ServerDisconnectedError as exc:
            if self._explain_disconnect is not None:
                refusal = await self._explain_disconnect(path)
                if refusal is not None:
                    raise refusal from None
            raise Retryable(f"{type(exc).__name__}: {exc}") from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Retryable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None

    async def call(
        self,
        method: str,
        prepare: Callable[[], Prepared | Awaitable[Prepared]],
        *,
        path: str,
        operation: str,
        what: str = "",
        body: Any = None,
        repeatable: bool = True,
        tail_bytes: int = 0,
    ) -> Answer:
        """The answer below 500, after retries, rate-limit waits and one token renewal.

        `prepare` makes each attempt's URL and headers. `repeatable=False` (a start): re-sent
        only when it provably never left; any other failure raises QrsAnswerLost at once.
        A rate limit is waited out and the call repeated (the site did not carry it out),
        until `retry.max_backoff_s` has been waited in all: then its answer is returned.
        """
        retry = self.retry
        what = what or f"{self.site} {method} /{path}"
        attempt, renewed, waited = 0, False, 0.0
        while True:
            attempt += 1
            started = self._clock()
            status = 0
            refused_token: str | None = None
            try:
                prepared = prepare()
                if not isinstance(prepared, Prepared):
                    prepared = await prepared
                if self.token is not None:
                    refused_token = await self.token.get()
                    headers = {**prepared.headers, "Authorization": f"Bearer {refused_token}"}
                    prepared = Prepared(prepared.url, headers, prepared.params)
                answer = await self.send(
                    method,
                    prepared,
                    path=path,
                    body=body,
                    tail_bytes=tail_bytes,
                )
                status = answer.status
                if status >= 500:
                    raise Retryable(f"HTTP {status}: {answer.text[:200]}", status)
            except Retryable as exc:
                await back_off(
                    exc,
                    what=what,
                    path=path,
                    attempt=attempt,
                    retry=retry,
                    repeatable=repeatable,
                    rng=self._rng,
                )
                continue
            finally:
                if self._observer is not None:
                    self._observer(operation, self._clock() - started, status)
            self.last_success = self._clock()
            if status == 401 and self.token is not None and not renewed:
                renewed = True  # expired early, or revoked: a new one, once
                await self.token.renew(refused_token)
                attempt -= 1
                continue
            wait = self._rate_limit(answer) if self._rate_limit is not None else None
            if wait is not None and waited + wait <= retry.max_backoff_s:
                logger.info("{} rate limit on {}: waiting {:.1f} s", self.site, what, wait)
                if self.on_rate_limit is not None:
                    self.on_rate_limit(wait)
                waited += wait
                await asyncio.sleep(wait)
                attempt -= 1
                continue
            return answer
