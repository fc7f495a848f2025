"""Logging: loguru to stderr, text (journald friendly) or one JSON object a line.

Standard `logging` records (aiohttp, paho) are routed into loguru. Under
journald (JOURNAL_STREAM is set) text lines carry no timestamp: the journal adds its own.

No secret reaches the log: tracebacks never show variable values (loguru's `diagnose` is off:
a request's headers would be printed with them), and a malformed HTTP request, which aiohttp
logs with its traceback and which a client can send as often as it likes, becomes one
rate-limited line that names only the kind of error. So do the event loop's errors about
accepting connections (running out of files).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from loguru import logger

from mqtt_starter.config import LogSettings
from mqtt_starter.ops.platform import console_attached, default_log_file, is_windows

if TYPE_CHECKING:
    from loguru import Message, Record


class RateLimitedLine:
    """One log line per `every_s` at most; the lines held back are counted in the next."""

    def __init__(self, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._next = 0.0
        self.held = 0

    def warning(self, text: str, *args: Any) -> None:
        now = self._clock()
        if now < self._next:
            self.held += 1
            return
        self._next = now + self.every_s
        suffix = f" ({self.held} more like it held back)" if self.held else ""
        self.held = 0
        logger.warning(text + suffix, *args)


class _Intercept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self._malformed = RateLimitedLine()
        self._accept = RateLimitedLine()

    def emit(self, record: logging.LogRecord) -> None:
        if self._contained(record):
            return
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).bind(logger_name=record.name).log(
            level, record.getMessage()
        )

    def _contained(self, record: logging.LogRecord) -> bool:
        """A client's malformed request or an accept error: one rate-limited line with the
        error's kind, never the request's bytes."""
        error = record.exc_info[1] if record.exc_info else None
        if record.name.startswith("aiohttp.server") and error is not None:
            self._malformed.warning(
                "HTTP: a malformed request was refused ({})", type(error).__name__
            )
            return True
        if record.name == "asyncio" and "accept" in record.getMessage():
            self._accept.warning(
                "HTTP: accepting a connection failed ({})",
                type(error).__name__ if error is not None else record.getMessage()[:80],
            )
            return True
        return False


def _json_object(
    when: datetime, level: str, name: str | None, message: str, exception: str | None = None
) -> str:
    """One JSON log line's object: the same fields for loguru's lines and request lines."""
    data = {"time": when.isoformat(), "level": level, "logger": name, "message": message}
    if exception:
        data["exception"] = exception
    return json.dumps(data, ensure_ascii=False)


def _json_fields(record: Record, exception: str | None) -> str:
    name = record["extra"].get("logger_name", record["name"])
    return _json_object(record["time"], record["level"].name, name, record["message"], exception)


def _json_sink(message: Message) -> None:
    record = message.record
    exception = None
    if record["exception"] is not None:
        exception = "".join(message.splitlines(keepends=True)[1:]).strip()
    sys.stderr.write(_json_fields(record, exception) + "\n")


def _json_file_format(record: Record) -> str:
    """A log file's JSON line: the line is kept in `extra` so that loguru's own formatting of
    the template leaves its braces alone."""
    exception = None
    if record["exception"] is not None:
        kind, value, trace = record["exception"]
        exception = "".join(traceback.format_exception(kind, value, trace)).strip()
    record["extra"]["json_line"] = _json_fields(record, exception)
    return "{extra[json_line]}\n"


class RequestLog:
    """The one line each request gets (DESIGN section 3), like a web server's access log.

    Where configure_logging sends the log to stderr, the line is written there directly, in the
    same format as loguru's own lines: loguru builds a full record for every line (the caller's
    frame, thread, process, an aware time), about 20 µs, a quarter of the daemon's own work on
    a request. Everywhere else (a log file, which loguru rotates; a test's sinks), the line goes
    through loguru, attributed to the caller. Request lines are written from the event loop's
    thread, each in one write of a line-buffered stream, so they never split another line.
    """

    def __init__(self) -> None:
        self._write: Callable[[str], None] | None = None
        self._through_loguru = 0

    def __call__(self, text: str) -> None:
        if self._write is None or self._through_loguru:
            logger.opt(depth=1).info(text)
        else:
            self._write(text)

    def direct(self, settings: LogSettings, name: str) -> None:
        """Write INFO lines straight to stderr as configure_logging's sink there does (text,
        or JSON with `name` as the logger); nothing when the level is above INFO."""
        if logger.level(settings.level).no > logger.level("INFO").no:
            self._write = _skip
        elif settings.format == "json":
            # As _json_sink: the stderr of the moment.
            self._write = lambda text: _write_flushed(sys.stderr, _json_line(name, text))
        else:
            # As loguru's stream sink: the stderr of the moment it was configured.
            stream, stamped = sys.stderr, not os.environ.get("JOURNAL_STREAM")
            self._write = lambda text: _write_flushed(stream, _text_line(text, stamped=stamped))

    def through_loguru_only(self) -> None:
        """Every line through loguru again (a file, or no log at all)."""
        self._write = None

    @contextmanager
    def through_loguru(self) -> Iterator[None]:
        """Within the block, every line goes through loguru (tests watch loguru's sinks)."""
        self._through_loguru += 1
        try:
            yield
        finally:
            self._through_loguru -= 1


def _skip(_text: str) -> None:
    return None


def _write_flushed(stream: TextIO, line: str) -> None:
    stream.write(line)
    stream.flush()  # as loguru's stream sink: a line is out when it is logged


def _text_line(text: str, *, stamped: bool) -> str:
    if not stamped:
        return f"INFO    {text}\n"
    now = datetime.now()
    return f"{now:%Y-%m-%d %H:%M:%S}.{now.microsecond // 1000:03d} INFO    {text}\n"


def _json_line(name: str, text: str) -> str:
    return _json_object(datetime.now().astimezone(), "INFO", name, text) + "\n"


# The module that writes request lines: the `logger` of their JSON form.
REQUEST_LOGGER = "mqtt_starter.service.requests"
# The daemon's request log, set up with loguru's sinks (loguru's logger is one per process too).
request_log = RequestLog()


def log_file(settings: LogSettings, *, console: bool | None = None) -> Path | None:
    """The file the log goes to: `log.file`; without a console (a Windows service), the
    platform's default file; else None (stderr)."""
    if settings.file is not None:
        return settings.file
    if console is None:
        console = console_attached()
    # A POSIX process always has somewhere to write (a terminal, journald, a container's log);
    # one whose stderr was closed logs nothing rather than guess a folder it may not own.
    return None if console or not is_windows() else Path(default_log_file())


def configure_logging(
    settings: LogSettings, *, console: bool | None = None, requests: RequestLog | None = None
) -> None:
    """loguru's sinks for `settings`, and the request log (`requests`, by default the
    daemon's) to match them."""
    requests = request_log if requests is None else requests
    logger.remove()
    requests.through_loguru_only()
    path = log_file(settings, console=console)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        json_format = settings.format == "json"
        logger.add(
            path,
            level=settings.level,
            format=_json_file_format
            if json_format
            else "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}",
            rotation=int(settings.rotate_mb * 1024 * 1024),
            retention=settings.keep_files,
            encoding="utf-8",
            colorize=False,
            diagnose=False,
            backtrace=False,
        )
    elif sys.stderr is None:
        pass  # nowhere to write (a closed stderr on POSIX)
    elif settings.format == "json":
        logger.add(
            _json_sink,
            level=settings.level,
            format="{message}\n{exception}",
            diagnose=False,
            backtrace=False,
        )
        requests.direct(settings, REQUEST_LOGGER)
    else:
        stamp = "" if os.environ.get("JOURNAL_STREAM") else "{time:YYYY-MM-DD HH:mm:ss.SSS} "
        logger.add(
            sys.stderr,
            level=settings.level,
            colorize=False,
            format=stamp + "{level: <7} {message}",
            diagnose=False,
            backtrace=False,
        )
        requests.direct(settings, REQUEST_LOGGER)
    logging.basicConfig(handlers=[_Intercept()], level=logging.INFO, force=True)
    # paho's own debug chatter is noise at INFO; aiohttp's access log is off in our servers.
    logging.getLogger("mqtt").setLevel(logging.WARNING)
