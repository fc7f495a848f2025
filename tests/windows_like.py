"""`python -m tests.windows_like ARGS`: `mqtt-starter ARGS` on an event loop that behaves as
Windows' does where signals are concerned: no `add_signal_handler`, no SIGHUP handling through
the loop. The run path must then stop through the plain `signal` module (Ctrl+C, Ctrl+Break and
a service stop arrive that way on Windows) and reload through `watch_config`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

from mqtt_starter import cli
from mqtt_starter.ops import platform as ops_platform


class WindowsLikeLoop(asyncio.SelectorEventLoop):
    """The selector loop (which the daemon uses on Windows) without signal handlers."""

    def add_signal_handler(  # type: ignore[override]
        self, sig: int, callback: Callable[..., object], *args: Any
    ) -> None:
        raise NotImplementedError

    def remove_signal_handler(self, sig: int) -> bool:
        raise NotImplementedError


def windows_like_loop(platform: str | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    return WindowsLikeLoop


if __name__ == "__main__":
    ops_platform.loop_factory = windows_like_loop
    sys.exit(cli.main())
