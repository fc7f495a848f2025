"""Calls to a Qlik Cloud tenant over the shared transport (sites/http.py): the bearer (an API
key, or an OAuth client's token, fetched with its scope, renewed before it expires and once for
any number of concurrent 401s), Qlik's rate limit (a 429 with `HTTP-429` or `Retry-After`,
waited out within a bound), Qlik's error bodies, and cursor paging.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from loguru import logger
from yarl import URL

from mqtt_starter.config import CloudSettings
from mqtt_starter.core.errors import (
    QrsAuthError,
    QrsRequestError,
    QrsUnavailable,
)
from mqtt_starter.core.model import (
    TaskStatus,
)
from mqtt_starter.core.pacing import StartPacer
from mqtt_starter.sites.http import Answer, Observer, Prepared, SharedToken, TlsFiles, Transport

# Qlik Cloud's reload states and their QRS counterparts (DESIGN.md section 8).
STATES = {
    "QUEUED": TaskStatus.QUEUED,
    "RELOADING": TaskStatus.STARTED,
    "CANCELING": TaskStatus.ABORT_INITIATED,
    "SUCCEEDED": TaskStatus.FINISHED_SUCCESS,
    "FAILED": TaskStatus.FINISHED_FAIL,
    "CANCELED": TaskStatus.ABORTED,
    "EXCEEDED_LIMIT": TaskStatus.ERROR,
}
PAGE = 100  # the API's largest page
MAX_PAGES = 100
TOKEN_MARGIN_S = 60.0  # a token is fetched again this long before it expires
LOG_TAIL_BYTES = 256 * 1024
KEPT = 10_000  # reloads whose last state and reason are remembered
# A reload created this long before the start call (clock skew) still counts as ours.
CREATION_SKEW_S = 2.0
RATE_LIMIT_CODE = "HTTP-429"


def _errors(data: Any) -> tuple[str, str]:
    """(code, "title: detail") of Qlik's error body."""
    errors = data.get("errors") if isinstance(data, dict) else None
    first = errors[0] if isinstance(errors, list) and errors and isinstance(errors[0], dict) else {}
    code = str(first.get("code", ""))
    text = ": ".join(str(first[k]) for k in ("title", "detail") if first.get(k))
    return code, text


def rate_limit_wait(answer: Answer) -> float | None:
    """How long a 429 asks to wait, when it is a rate limit: Qlik's `HTTP-429` or a
    `Retry-After` (qlik-cloud-api.md). A pending-reload 429, or one from a proxy with an HTML
    page, is not one (None)."""
    if answer.status != 429:
        return None
    code, _ = _errors(answer.json())
    header = answer.headers.get("Retry-After")
    if code != RATE_LIMIT_CODE and header is None:
        return None
    try:
        return max(0.0, float(header)) if header is not None else 1.0
    except ValueError:
        return 1.0


def _item_tags(item: Mapping[str, Any]) -> set[str]:
    """The tags an item carries (`meta.tags`): no query per tag is needed to know them."""
    meta = item.get("meta")
    found = meta.get("tags") if isinstance(meta, Mapping) else None
    return {
        str(t["name"])
        for t in found or ()
        if isinstance(t, Mapping) and isinstance(t.get("name"), str)
    }


def _time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


class CloudApi:
    """Calls to the tenant: `await api.start()` once, then `call`/`json`/`list`."""

    def __init__(
        self,
        settings: CloudSettings,
        *,
        observer: Observer | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        rate_window_s: float = 60.0,
    ) -> None:
        """`rate_window_s`: the window of max_starts_per_minute (a minute; tests shorten it)."""
        self.settings = settings
        self._clock = clock
        self.pacer = StartPacer(settings.max_starts_per_minute, rate_window_s)
        self.throttled = 0.0  # seconds starts have waited for the rate limit, in all
        self.token = (
            SharedToken(self._fetch_token, clock=clock, margin_s=TOKEN_MARGIN_S)
            if settings.auth == "oauth"
            else None
        )
        self.transport = Transport(
            "Qlik Cloud",
            settings.tenant_url,
            TlsFiles(ca_file=settings.ca_file, ca_key="cloud.ca_file"),
            timeout_s=settings.timeout_s,
            max_concurrency=settings.max_concurrency,
            retry=settings.retry,
            trust_env=True,  # HTTPS_PROXY, NO_PROXY
            observer=observer,
            rng=rng,
            clock=clock,
            token=self.token,
            rate_limit=rate_limit_wait,
            certificate_hint=lambda _: "behind a TLS-inspecting proxy, set cloud.ca_file to its CA",
        )
        self.transport.on_rate_limit = self._rate_limited

    @property
    def last_success(self) -> float | None:
        """Monotonic time of the last call the tenant answered."""
        return self.transport.last_success

    async def start(self) -> None:
        """Load the TLS set-up (ConfigError naming cloud.ca_file when it cannot be used)."""
        await self.transport.start()

    async def close(self) -> None:
        await self.transport.close()

    def _rate_limited(self, wait: float) -> None:
        self.pacer.blocked(self._clock(), wait)
        self.throttled += wait

    async def _fetch_token(self) -> tuple[str, float]:
        s = self.settings
        assert s.client_id is not None and s.client_secret is not None
        body = {
            "client_id": s.client_id,
            "client_secret": s.client_secret.get_secret_value(),
            "scope": s.scope,
            "grant_type": "client_credentials",
        }
        answer = await self.transport.send(
            "POST",
            Prepared(f"{s.tenant_url}/oauth/token", {}),
            path="oauth/token",
            body=body,
        )
        data = answer.json()
        if answer.status >= 500:
            raise QrsUnavailable(f"Qlik Cloud OAuth token endpoint: HTTP {answer.status}")
        token = data.get("access_token") if isinstance(data, dict) else None
        lifetime = data.get("expires_in") if isinstance(data, dict) else None
        if answer.status != 200 or not isinstance(token, str):
            code, text = _errors(data)
            raise QrsAuthError(
                f"Qlik Cloud refused the OAuth client {s.client_id!r}: HTTP {answer.status}"
                f" {code} {text}".rstrip()
                + "; check cloud.client_id, cloud.client_secret and cloud.scope",
                status=answer.status,
            )
        logger.debug("Qlik Cloud OAuth token fetched for client {}", s.client_id)
        return token, float(lifetime) if isinstance(lifetime, int | float) else 3600.0

    def _bearer(self) -> Mapping[str, str]:
        s = self.settings
        if s.auth == "api_key":
            assert s.api_key is not None
            return {"Authorization": f"Bearer {s.api_key.get_secret_value()}"}
        return {}  # the shared token is added by the transport

    async def call(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        *,
        repeatable: bool = True,
        tail_bytes: int = 0,
    ) -> tuple[int, Any]:
        """(status, data) of an answer below 500, after retries, rate-limit waits and one token
        renewal; 401 raises QrsAuthError."""
        url = f"{self.settings.tenant_url}/{path}"
        answer = await self.transport.call(
            method,
            lambda: Prepared(url, self._bearer(), params),
            path=path,
            operation=f"{method} {path.split('/')[2] if path.count('/') >= 2 else path}",
            body=body,
            repeatable=repeatable,
            tail_bytes=tail_bytes,
        )
        data: Any = answer.text if tail_bytes and answer.status < 300 else answer.json()
        if answer.status == 401:
            _, text = _errors(data)
            raise QrsAuthError(
                f"Qlik Cloud refused {method} /{path}: HTTP 401 {text}; check"
                f" cloud.{'api_key' if self.settings.auth == 'api_key' else 'client_id'}",
                status=401,
                path=path,
                detail=text,
            )
        return answer.status, data

    async def json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        status, data = await self.call("GET", path, params)
        if status >= 400:
            code, text = _errors(data)
            error = QrsAuthError if status == 403 else QrsRequestError
            raise error(
                f"Qlik Cloud answered GET /{path} with HTTP {status}: {code} {text}".rstrip(),
                status=status,
                path=path,
                detail=f"{code} {text}".strip(),
            )
        return data

    async def list(self, path: str, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """Every item of a paged list (`links.next.href`)."""
        found: list[dict[str, Any]] = []
        query: dict[str, str] = {**params, "limit": str(PAGE)}
        for _ in range(MAX_PAGES):
            data = await self.json(path, query)
            page = data.get("data") if isinstance(data, dict) else None
            found += [i for i in page or [] if isinstance(i, dict)]
            href = (
                data.get("links", {}).get("next", {}).get("href")
                if isinstance(data, dict)
                else None
            )
            if not isinstance(href, str) or not href:
                return found
            query = dict(URL(href).query)
        logger.warning("Qlik Cloud /{}: more than {} pages; the rest is left", path, MAX_PAGES)
        return found
