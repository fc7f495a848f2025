"""Logging: loguru to stderr, text (journald friendly) or one JSON object a line.

Standard `logging` records (aiohttp, paho through aiomqtt) are routed into loguru. Under
journald (JOURNAL_STREAM is set) text lines carry no timestamp: the journal adds its own.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import TYPE_CHECKING

from loguru import logger

from .config import LogSettings

if TYPE_CHECKING:
    from loguru import Message


class _Intercept(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).bind(logger_name=record.name).log(
            level, record.getMessage()
        )


def _json_sink(message: Message) -> None:
    record = message.record
    data = {
        "time": record["time"].isoformat(),
        "level": record["level"].name,
        "logger": record["extra"].get("logger_name", record["name"]),
        "message": record["message"],
    }
    if record["exception"] is not None:
        data["exception"] = "".join(message.splitlines(keepends=True)[1:]).strip()
    sys.stderr.write(json.dumps(data, ensure_ascii=False) + "\n")


def configure_logging(settings: LogSettings) -> None:
    logger.remove()
    if settings.format == "json":
        logger.add(_json_sink, level=settings.level, format="{message}\n{exception}")
    else:
        stamp = "" if os.environ.get("JOURNAL_STREAM") else "{time:YYYY-MM-DD HH:mm:ss.SSS} "
        logger.add(
            sys.stderr, level=settings.level, colorize=False, format=stamp + "{level: <7} {message}"
        )
    logging.basicConfig(handlers=[_Intercept()], level=logging.INFO, force=True)
    # paho's own debug chatter is noise at INFO; aiohttp's access log is off in our servers.
    logging.getLogger("mqtt").setLevel(logging.WARNING)
