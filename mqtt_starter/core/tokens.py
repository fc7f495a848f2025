"""What a JWT says about its own expiry. Pure; the signature is the proxy's business, not ours.

A JWT is three base64url parts; the middle one is a JSON object whose `exp` is the expiry in
seconds since the epoch. Anything that does not read that way has no known expiry.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime

# A token that expires within this many seconds is warned about.
EXPIRY_WARNING_S = 7 * 86400


def token_expiry(token: str) -> float | None:
    """`exp` of a JWT in seconds since the epoch, None when the token carries none."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        return None
    try:
        payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
        claims = json.loads(payload)
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def expiry_warning(exp: float | None, now: float) -> str | None:
    """A sentence for the log when the token has expired or soon will; None otherwise."""
    if exp is None:
        return None
    when = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%d %H:%M UTC")
    if exp <= now:
        return f"the QRS JWT expired at {when}: the virtual proxy will refuse it"
    if exp - now < EXPIRY_WARNING_S:
        return f"the QRS JWT expires at {when}, in {(exp - now) / 86400:.1f} days: renew it"
    return None
