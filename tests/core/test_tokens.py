"""A JWT's expiry, read without verifying it, and the warning it earns."""

from __future__ import annotations

import base64
import json

import pytest

from mqtt_starter.core.tokens import expiry_warning, token_expiry

NOW = 1_800_000_000.0  # 2027-01-15 08:00 UTC


def token(claims: object) -> str:
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJSUzI1NiJ9.{body}.c2ln"


@pytest.mark.parametrize(
    ("text", "exp"),
    [
        (token({"exp": 1800000000}), 1800000000.0),
        (token({"exp": 1.5}), 1.5),
        (token({"sub": "x"}), None),
        (token({"exp": "soon"}), None),
        (token({"exp": True}), None),
        (token([1, 2]), None),
        ("not-a-jwt", None),
        ("a.%%%.c", None),
        ("a.bm90IGpzb24.c", None),
    ],
)
def test_token_expiry(text: str, exp: float | None) -> None:
    assert token_expiry(text) == exp


@pytest.mark.parametrize(
    ("exp", "warning"),
    [
        (None, None),
        (NOW + 30 * 86400, None),
        (NOW + 3 * 86400, "the QRS JWT expires at 2027-01-18 08:00 UTC, in 3.0 days: renew it"),
        (NOW - 60, "the QRS JWT expired at 2027-01-15 07:59 UTC: the virtual proxy will refuse it"),
    ],
)
def test_expiry_warning(exp: float | None, warning: str | None) -> None:
    assert expiry_warning(exp, NOW) == warning
