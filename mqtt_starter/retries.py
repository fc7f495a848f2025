"""What the site clients (QRS, Qlik Cloud) share about a failed call: whether it may be sent
again, and how long to wait first.

A call is retried on connection errors, timeouts and 5xx, with full-jitter exponential
backoff. A call that is not repeatable (a start) is sent again only when it provably never
left (the connection could not be made); any other failure is a lost answer (QrsAnswerLost),
for the caller to read back what happened.
"""

from __future__ import annotations

import asyncio
import random

from .config import RetrySettings
from .core.errors import QrsAnswerLost, QrsUnavailable


class Retryable(Exception):
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
