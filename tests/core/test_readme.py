"""The configuration reference in docs/ is the one the config model generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from mqtt_starter.config.reference import END, START, main, reference, rewrite

REFERENCE = Path(__file__).parents[2] / "docs" / "configuration.md"


def test_the_configuration_reference_matches_the_model() -> None:
    text = REFERENCE.read_text("utf-8")
    assert START in text and END in text
    assert rewrite(text) == text, (
        "run: python -m mqtt_starter.config.reference docs/configuration.md"
    )


def test_reference_names_every_key_of_the_example() -> None:
    table = reference()
    for key in (
        "mqtt.tls.cert_file",
        "qrs.retry.max_backoff_s",
        "policy.allow.task_ids",
        "routes[].when.equals",
        "http.token",
        "log.format",
    ):
        assert f"| `{key}` |" in table


def test_the_reference_writer_needs_its_page(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: python -m mqtt_starter.config.reference docs/configuration.md" in (
        capsys.readouterr().err
    )
