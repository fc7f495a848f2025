"""Keeps the HTTP endpoint up under hostile clients: a cap on open connections below the
process's file limit, and a deadline for a connection to finish its request.

aiohttp waits for a request's headers as long as the client cares to send them, so a client
that never finishes holds a connection, and a file, for good; enough of them exhaust the
process's files and nothing can connect any more (readiness fails). Here each connection gets
`request_timeout_s` to deliver a complete request (and again after each response); a
connection still in its headers then is closed. At the cap, the oldest connection that is not
serving a request makes room for the new one, so a flood of idle connections cannot lock out
`/healthz`. What it drops is counted and logged as one rate-limited line, never per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Callable
from typing import cast

from mqtt_starter.ops.logs import RateLimitedLine

# Files the process keeps for everything else (broker, site, logs) below its limit.
FILES_KEPT = 64


def connection_cap(wanted: int) -> int:
    """`wanted`, or less when the process's file limit is lower (POSIX; elsewhere `wanted`)."""
    try:
        import resource
    except ImportError:  # Windows
        return wanted
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, int(soft) - FILES_KEPT))


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, under the guard's rules."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.busy = False  # serving a request now
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's does not derive from asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self.guard.admit(self)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        self.inner.connection_lost(exc)

    def arm(self) -> None:
        self.disarm()
        loop = asyncio.get_running_loop()
        self.deadline = loop.call_later(self.guard.timeout_s, self.guard.too_slow, self)

    def disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def drop(self) -> None:
        self.disarm()
        if self.transport is not None:
            self.transport.abort()


class ConnectionGuard:
    """Wraps aiohttp's protocol factory; `begin(transport)`/`end(transport)` from a middleware
    mark a connection busy while it serves a request."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], *, cap: int, timeout_s: float):
        self.factory = factory
        self.cap = cap
        self.timeout_s = timeout_s
        self._open: OrderedDict[asyncio.BaseTransport, _Guarded] = OrderedDict()
        self._log = RateLimitedLine()
        self.dropped_slow = 0
        self.evicted = 0

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self, self.factory())

    @property
    def open(self) -> int:
        return len(self._open)

    def admit(self, guarded: _Guarded) -> None:
        if len(self._open) >= self.cap:
            idle = next((g for g in self._open.values() if not g.busy), None)
            if idle is not None:
                self.evicted += 1
                self._log.warning(
                    "HTTP: {} connections open (the cap): the oldest idle one was closed",
                    self.cap,
                )
                self.forget(idle)
                idle.drop()
        assert guarded.transport is not None
        self._open[guarded.transport] = guarded
        guarded.arm()

    def forget(self, guarded: _Guarded) -> None:
        guarded.disarm()
        if guarded.transport is not None:
            self._open.pop(guarded.transport, None)

    def too_slow(self, guarded: _Guarded) -> None:
        if guarded.busy:
            return
        self.dropped_slow += 1
        self._log.warning(
            "HTTP: a connection did not finish its request within {:g} s and was closed",
            self.timeout_s,
        )
        self.forget(guarded)
        guarded.drop()

    def begin(self, transport: asyncio.BaseTransport | None) -> None:
        guarded = self._open.get(transport) if transport is not None else None
        if guarded is not None:
            guarded.busy = True
            guarded.disarm()
            self._open.move_to_end(transport)  # type: ignore[arg-type]

    def end(self, transport: asyncio.BaseTransport | None) -> None:
        guarded = self._open.get(transport) if transport is not None else None
        if guarded is not None:
            guarded.busy = False
            with contextlib.suppress(RuntimeError):
                guarded.arm()
