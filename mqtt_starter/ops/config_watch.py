"""`watch_config`: a change of the configuration file reloads it, as SIGHUP does.

For Windows and containers, which have no SIGHUP (or where sending one is awkward). The file
is polled, not watched through inotify: polling works the same on every platform and on
network and bind-mounted folders, and one `stat` a second costs nothing.

A change is acted on once the file has stood still for one poll, so that an editor's write in
several steps is read whole. The contents are compared, not only the times: a `touch` reloads
nothing. What is invalid is refused by the reload itself (the running configuration stays and
the key is logged); the watch remembers what it last saw, not what was applied, so the same
broken file is not retried every second, and the next change is read.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

from loguru import logger

Stamp = tuple[int, int, int]


def _stamp(path: Path) -> Stamp | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class ConfigWatch:
    """Polls `path` every `interval_s` and calls `on_change` when its contents changed."""

    def __init__(
        self,
        path: Path,
        on_change: Callable[[], None],
        *,
        enabled: Callable[[], bool] = lambda: True,
        interval_s: float = 1.0,
    ) -> None:
        self.path = path
        self._on_change = on_change
        self._enabled = enabled
        self.interval_s = interval_s
        self._stamp = _stamp(path)
        self._digest = _digest(path)
        self._missing_said = False

    def poll(self, stamp: Stamp | None, previous: Stamp | None) -> bool:
        """One look at the file; True when a change was handed on. `previous` is the stamp one
        poll ago: a file still being written is left for the next."""
        if stamp is None:
            if not self._missing_said:
                logger.warning(
                    "watch_config: {} is gone; the running configuration stays", self.path
                )
                self._missing_said = True
            return False
        self._missing_said = False
        if stamp == self._stamp or stamp != previous or not self._enabled():
            return False
        self._stamp = stamp
        digest = _digest(self.path)
        if digest is None or digest == self._digest:
            return False
        self._digest = digest
        logger.info("watch_config: {} changed; reloading", self.path)
        self._on_change()
        return True

    async def run(self) -> None:
        previous = self._stamp
        while True:
            await asyncio.sleep(self.interval_s)
            if not self._enabled():
                continue  # watch_config is off: not even a stat
            stamp = await asyncio.to_thread(_stamp, self.path)
            self.poll(stamp, previous)
            previous = stamp
