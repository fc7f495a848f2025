"""What differs between Linux, containers and Windows, in one place.

- Where the configuration lives by default: `/etc/mqtt-starter/` on POSIX,
  `%ProgramData%\\mqtt-starter\\` on Windows.
- Which event loop runs: uvloop (its socket handling is several times cheaper than asyncio's),
  except on Windows, where uvloop does not exist: there asyncio's selector loop, since paho
  needs `add_reader`/`add_writer`, which the default proactor loop lacks.
- How a stop and a reload arrive. asyncio offers `add_signal_handler` on POSIX only; elsewhere
  (Windows: Ctrl+C, Ctrl+Break, a service stop through WinSW, which sends Ctrl+C) the plain
  `signal` module catches them and hands them to the loop. Reload without SIGHUP is
  `watch_config` (ops/config_watch.py).
- Whether a console is attached: a Windows service has none, and then the log goes to a
  rotating file (ops/logs.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path, PureWindowsPath
from types import FrameType
from typing import Any, TypeVar

from loguru import logger

T = TypeVar("T")

CONFIG_NAME = "mqtt-starter.yaml"
POSIX_CONFIG_DIR = Path("/etc/mqtt-starter")


def is_windows(platform: str | None = None) -> bool:
    return (platform or sys.platform) == "win32"


def program_data(environ: Mapping[str, str] | None = None) -> PureWindowsPath:
    """`%ProgramData%\\mqtt-starter`: Windows' place for a service's configuration and logs."""
    env = os.environ if environ is None else environ
    return PureWindowsPath(env.get("ProgramData") or r"C:\ProgramData") / "mqtt-starter"


def default_config_path(
    platform: str | None = None, environ: Mapping[str, str] | None = None
) -> Path | PureWindowsPath:
    """The configuration file `-c` defaults to on this platform."""
    if is_windows(platform):
        return program_data(environ) / CONFIG_NAME
    return POSIX_CONFIG_DIR / CONFIG_NAME


def default_log_file(environ: Mapping[str, str] | None = None) -> PureWindowsPath:
    """Where a Windows service logs when `log.file` is not set."""
    return program_data(environ) / "logs" / "mqtt-starter.log"


def console_attached(platform: str | None = None) -> bool:
    """False for a process with nowhere to write its log: no stderr at all (pythonw), or on
    Windows no console (a service: WinSW gives it pipes, not a console)."""
    if sys.stderr is None:
        return False
    if not is_windows(platform):
        return True
    import ctypes

    windll: Any = getattr(ctypes, "windll", None)
    return windll is None or bool(windll.kernel32.GetConsoleWindow())


def loop_factory(platform: str | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop the commands run on: uvloop where it is installed (it is a dependency
    except on Windows, which it does not support); the selector loop on Windows (paho needs
    add_reader); asyncio's default otherwise, or when MQTT_STARTER_LOOP=asyncio asks for it."""
    if is_windows(platform):
        return asyncio.SelectorEventLoop
    if os.environ.get("MQTT_STARTER_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """ "uvloop" or "asyncio's selector loop": which loop the log says the daemon runs on."""
    kind = type(loop)
    return "uvloop" if kind.__module__.startswith("uvloop") else f"asyncio ({kind.__name__})"


def run(coroutine: Coroutine[Any, Any, T], platform: str | None = None) -> T:
    """asyncio.run on this platform's loop."""
    with asyncio.Runner(loop_factory=loop_factory(platform)) as runner:
        return runner.run(coroutine)


# Ctrl+Break arrives as SIGBREAK, which exists on Windows only.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGBREAK") if hasattr(signal, name)
)


class StopSignals:
    """Stop (and, where it exists, reload) requests from the operating system, on any loop.

    With `add_signal_handler` (POSIX) the loop reads them itself. Without it (Windows, or a
    loop that does not offer it) `signal.signal` catches them and hands them to the loop
    thread-safely; there is no SIGHUP there, so reload is left to `watch_config`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_stop: Callable[[], None],
        on_reload: Callable[[], None] | None = None,
    ) -> None:
        self._loop = loop
        self._on_stop = on_stop
        self._on_reload = on_reload
        self._loop_handled: list[signal.Signals] = []
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        wanted: list[tuple[signal.Signals, Callable[[], None]]] = [
            (sig, self._on_stop) for sig in STOP_SIGNALS
        ]
        if self._on_reload is not None and hasattr(signal, "SIGHUP"):
            wanted.append((signal.SIGHUP, self._on_reload))
        try:
            for sig, callback in wanted:
                self._loop.add_signal_handler(sig, callback)
                self._loop_handled.append(sig)
            return
        except NotImplementedError:
            pass
        for sig, callback in wanted:
            self._catch(sig, callback)
        logger.debug("stop signals caught without the event loop (no add_signal_handler here)")

    def _catch(self, sig: signal.Signals, callback: Callable[[], None]) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self._loop.call_soon_threadsafe(callback)

        try:
            self._previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError) as exc:
            # Not the main thread, or a signal this platform cannot catch.
            logger.debug("cannot catch {}: {}", sig.name, exc)

    def remove(self) -> None:
        for sig in self._loop_handled:
            self._loop.remove_signal_handler(sig)
        self._loop_handled.clear()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
