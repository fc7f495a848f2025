"""Who may call the simulated tenant: API keys, and OAuth tokens that client credentials get,
which expire, and which reach nothing when asked for without a scope (qlik-cloud-api.md).
"""

from __future__ import annotations

import secrets
import time
from typing import Any

from mqtt_starter.simulators.cloud.errors import ApiError
from mqtt_starter.simulators.cloud.fixtures import CloudFixture


class Access:
    """The tokens issued (token → monotonic expiry) and the bearers accepted."""

    def __init__(self, fixture: CloudFixture) -> None:
        self.fixture = fixture
        self.tokens: dict[str, float] = {}
        self.scopeless: set[str] = set()  # tokens issued without a scope: they reach nothing
        self.issued = 0

    def issue_token(self, client_id: str, client_secret: str, scope: str = "") -> dict[str, Any]:
        if not any(
            c.client_id == client_id and c.client_secret == client_secret
            for c in self.fixture.oauth_clients
        ):
            raise ApiError(401, "OAUTH-1", "invalid_client", "unknown client or wrong secret")
        token = secrets.token_urlsafe(24)
        lifetime = self.fixture.token_lifetime_s
        self.tokens[token] = time.monotonic() + lifetime
        if not scope.split():
            self.scopeless.add(token)
        self.issued += 1
        return {"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}

    def authorised(self, header: str | None) -> bool:
        if header is None or not header.startswith("Bearer "):
            return False
        token = header.removeprefix("Bearer ")
        if token in self.fixture.api_keys:
            return True
        expiry = self.tokens.get(token)
        return expiry is not None and time.monotonic() < expiry

    def scoped(self, header: str | None) -> bool:
        """Whether the bearer may reach anything (an OAuth token asked for without a scope
        reaches nothing)."""
        return (header or "").removeprefix("Bearer ") not in self.scopeless
