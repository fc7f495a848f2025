"""The request log: each request's line written straight to stderr, exactly as loguru writes
its own lines there (text, journald's text, JSON), and through loguru wherever else the log
goes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from loguru import logger

from mqtt_starter.config import LogSettings
from mqtt_starter.ops.logs import REQUEST_LOGGER, RequestLog, configure_logging
from tests.conftest import restore_logging

LINE = "request mqtt butler/start/id/{x} requestId=r-1 -> ok started=1 unmatched=0 in 3 ms"
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} "


class Stderr:
    """What the test writes to stderr (pytest's capsys), read line by line."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def lines(self) -> list[str]:
        return self.capsys.readouterr().err.splitlines()


@pytest.fixture
def stderr(capsys: pytest.CaptureFixture[str]) -> Iterator[Stderr]:
    """The test's stderr; the test's logging set up again afterwards."""
    yield Stderr(capsys)
    restore_logging()


def loguru_line_and_request_line(stream: Stderr, requests: RequestLog) -> list[str]:
    logger.info(LINE.replace("{x}", "{}"), "{x}")  # loguru's own line, the same text
    requests(LINE)
    return stream.lines()


def test_a_request_line_is_written_as_loguru_writes_a_line_to_stderr(
    stderr: Stderr, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    requests = RequestLog()
    configure_logging(LogSettings(), console=True, requests=requests)
    by_loguru, direct = loguru_line_and_request_line(stderr, requests)
    pattern = STAMP + r"INFO    " + re.escape(LINE)
    assert re.fullmatch(pattern, by_loguru) and re.fullmatch(pattern, direct)


def test_under_journald_a_request_line_has_no_stamp_as_loguru_has_none(
    stderr: Stderr, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    requests = RequestLog()
    configure_logging(LogSettings(), console=True, requests=requests)
    assert loguru_line_and_request_line(stderr, requests) == [f"INFO    {LINE}"] * 2


def test_a_json_request_line_has_the_fields_of_loguru_json_lines(stderr: Stderr) -> None:
    requests = RequestLog()
    configure_logging(LogSettings(format="json"), console=True, requests=requests)
    by_loguru, direct = (
        json.loads(line) for line in loguru_line_and_request_line(stderr, requests)
    )
    assert by_loguru["logger"] == "tests.shell.test_request_log"
    assert {**direct, "time": "", "logger": ""} == {**by_loguru, "time": "", "logger": ""}
    assert direct["logger"] == REQUEST_LOGGER
    # Both times are ISO 8601 with the local offset.
    offset = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d"
    assert re.fullmatch(offset, direct["time"]) and re.fullmatch(offset, by_loguru["time"])


def test_above_info_no_request_line_is_written(stderr: Stderr) -> None:
    requests = RequestLog()
    configure_logging(LogSettings(level="WARNING"), console=True, requests=requests)
    assert loguru_line_and_request_line(stderr, requests) == []


def test_into_a_log_file_request_lines_go_through_loguru(stderr: Stderr, tmp_path: Path) -> None:
    requests = RequestLog()
    path = tmp_path / "mqtt-starter.log"
    configure_logging(LogSettings(file=path), console=True, requests=requests)
    requests(LINE)
    configure_logging(LogSettings(level="DEBUG"), console=True)  # closes the file
    [line] = path.read_text("utf-8").splitlines()
    assert re.fullmatch(STAMP + r"INFO    " + re.escape(LINE), line)
    assert stderr.lines() == []


def test_while_tests_watch_loguru_request_lines_reach_its_sinks(stderr: Stderr) -> None:
    requests = RequestLog()
    configure_logging(LogSettings(), console=True, requests=requests)
    seen: list[str] = []
    sink = logger.add(lambda m: seen.append(f"{m.record['name']}: {m.record['message']}"))
    try:
        with requests.through_loguru():
            requests(LINE)
    finally:
        logger.remove(sink)
    # Attributed to whoever wrote the line, as a logger.info there would be.
    assert seen == [f"tests.shell.test_request_log: {LINE}"]
