"""The bearer JWT for a JWT virtual proxy: from `qrs.jwt`, or from `qrs.jwt_file`, read again
when the file changes (so a token can be renewed without a restart); a token that expires
within a week is warned about at start and then hourly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from mqtt_starter.config import QrsSettings
from mqtt_starter.core.errors import ConfigError
from mqtt_starter.core.tokens import expiry_warning, token_expiry

# How often a jwt_file is looked at for a new token, and a near expiry warned about again.
TOKEN_CHECK_S = 2.0
EXPIRY_WARN_EVERY_S = 3600.0


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


class JwtSource:
    """The current token; `on_change` is told when the file brings a new one."""

    def __init__(
        self, settings: QrsSettings, clock: Callable[[], float], on_change: Callable[[], None]
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._on_change = on_change
        self._token: _Token | None = None

    async def load(self) -> None:
        """Read the token (ConfigError naming qrs.jwt_file when it cannot be read)."""
        self._token = await self._read()

    async def _read(self) -> _Token:
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

    async def current(self) -> str:
        """The token to send now: the file is looked at again every TOKEN_CHECK_S."""
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
                    self._token = await self._read()
                    # A new token may be another user: its proxy session starts afresh.
                    self._on_change()
                    logger.info("qrs.jwt_file changed: using the new token")
            except (OSError, ConfigError) as exc:
                logger.warning("qrs.jwt_file {}: keeping the current token ({})", token.path, exc)
        return self._token.value if self._token is not None else token.value
