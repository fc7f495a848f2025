"""`mqtt-starter health`: is the local daemon ready? The container's health check.

It asks the daemon's own `/readyz` (DESIGN section 12) on the address of `http.host` (a wildcard
address is asked on loopback), with `http.token` when one is set, and answers with one line and
an exit code: 0 ready, 1 not running or not ready (the line says which), 78 a configuration it
cannot use (no HTTP endpoint to ask). Standard library only: it runs every few seconds in a
container and should start fast.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass

from mqtt_starter.config import Settings
from mqtt_starter.core.errors import EXIT_CONFIG

WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


@dataclass(frozen=True)
class Health:
    """The exit code and the one line that says why."""

    code: int
    line: str


def readyz_url(settings: Settings) -> str:
    http = settings.http
    host = WILDCARDS.get(http.host, http.host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if http.tls.enabled else "http"
    return f"{scheme}://{host}:{http.port}/readyz"


def _tls() -> ssl.SSLContext:
    # The daemon asked is this host's own, by address, not by the name on its certificate:
    # the answer says only ready or not, and the token goes to our own loopback listener.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def check_health(settings: Settings, timeout_s: float = 5.0) -> Health:
    """Ask `/readyz` once."""
    if not settings.http.enabled:
        return Health(
            EXIT_CONFIG, "http.enabled is false: the health check asks the HTTP endpoint's /readyz"
        )
    url = readyz_url(settings)
    request = urllib.request.Request(url)
    if settings.http.token is not None:
        request.add_header("Authorization", f"Bearer {settings.http.token.get_secret_value()}")
    # Straight to our own listener: an HTTP(S)_PROXY of the environment (common on servers
    # behind a corporate proxy) must not carry the question, or the token, elsewhere.
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if url.startswith("https"):
        handlers.append(urllib.request.HTTPSHandler(context=_tls()))
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(request, timeout=timeout_s):
            return Health(0, f"ready ({url})")
    except urllib.error.HTTPError as exc:
        if exc.code == 503:
            return Health(1, f"not ready: {_reasons(exc.read())} ({url})")
        if exc.code == 401:
            return Health(1, f"not ready: {url} refused http.token (401)")
        return Health(1, f"not ready: {url} answered {exc.code}")
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return Health(1, f"not running: nothing answers at {url} ({reason})")


def _reasons(body: bytes) -> str:
    try:
        reasons = json.loads(body).get("reasons")
    except (ValueError, AttributeError):
        reasons = None
    if isinstance(reasons, list) and reasons:
        return "; ".join(str(reason) for reason in reasons)
    return "the daemon says it is not ready"
