"""sd_notify for `Type=notify` units: READY=1, WATCHDOG=1, STATUS=, STOPPING=1.

Does nothing without NOTIFY_SOCKET. The watchdog interval comes from WATCHDOG_USEC (honoured
only when WATCHDOG_PID is unset or ours); pings go at half of it while the event loop runs.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping
from contextlib import suppress


class Notifier:
    """systemd's notifications (sd_notify): READY, WATCHDOG, STATUS, STOPPING."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1_000_000 if usec.isdigit() and ours else None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, *lines: str) -> None:
        if not self.address:
            return
        # OSError: systemd went away; there is nothing a daemon can do about that.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, suppress(OSError):
            sock.sendto("\n".join(lines).encode("utf-8"), self.address)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    def reloading(self) -> None:
        self.notify("RELOADING=1", "STATUS=reloading the configuration")

    async def watchdog(self) -> None:
        """Ping at half the interval for as long as the event loop gets to run this."""
        if self.watchdog_s is None or not self.address:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s / 2)
