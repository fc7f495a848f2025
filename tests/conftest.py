"""Shared fixtures: certificates, the QRS simulator over real mutual TLS, and a QRS client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loguru import logger

from mqtt_starter.config import LogSettings, QrsSettings, RetrySettings
from mqtt_starter.ops.logs import configure_logging, request_log
from mqtt_starter.simulators.certs import CertPaths, ensure_certificates
from mqtt_starter.simulators.qrs.fixtures import Fixture, load_fixture
from mqtt_starter.simulators.qrs.server import QrsSimulator
from mqtt_starter.simulators.qrs.state import SimState
from mqtt_starter.sites.qrs import QrsClient

DATA = Path(__file__).parent / "data"


class LoggedExceptions:
    """Exceptions the code under test logged with a traceback (logger.exception)."""

    def __init__(self) -> None:
        self.records: list[str] = []
        self.expected = False

    def expect(self) -> list[str]:
        """The test expects one or more: they are its to assert, and do not fail it."""
        self.expected = True
        return self.records


def restore_logging() -> None:
    """Logging as the suite runs with it, after a test that configured its own: to the
    worker's own stderr (pytest captures it per test at the descriptor). Not to `sys.stderr`
    of the moment: in a test with `capsys` that is a stream closed after the test, and every
    later line would fail on it (or land in another test's captured output)."""
    with contextlib.redirect_stderr(sys.__stderr__):
        configure_logging(LogSettings(level="DEBUG"), console=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first, in their order, then the rest: the workers (pytest-xdist's
    worksteal) share out the many short tests at the end, so that no long one starts last
    and runs alone while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def logged_exceptions() -> Iterator[LoggedExceptions]:
    """Fails the test when the code logs an unexpected exception (a blind `except Exception`
    must not hide a bug from the suite), unless the test calls `.expect()`."""
    seen = LoggedExceptions()

    def sink(message: Any) -> None:
        record = message.record
        if record["exception"] is not None:
            seen.records.append(f"{record['name']}: {record['message']}")

    handle = logger.add(sink, level="DEBUG")
    # Request lines too go through loguru, whatever a test of configure_logging set up.
    with request_log.through_loguru():
        yield seen
    # A test of configure_logging has removed every sink already.
    with contextlib.suppress(ValueError):
        logger.remove(handle)
    if seen.records and not seen.expected:
        pytest.fail(f"the code logged unexpected exceptions: {seen.records}", pytrace=False)


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The messages logged during the test (INFO and above)."""
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(str(m.record["message"])), level="INFO")
    yield messages
    logger.remove(sink)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return ensure_certificates(tmp_path_factory.mktemp("qrs-certs"))


@pytest.fixture(scope="session")
def task_fixture() -> Fixture:
    return load_fixture(DATA / "tasks.yaml")


@pytest.fixture
async def simulator(certs: CertPaths, task_fixture: Fixture) -> AsyncIterator[QrsSimulator]:
    sim = QrsSimulator(task_fixture, certs)
    await sim.start()
    yield sim
    await sim.stop()


@pytest.fixture
def sim_state(simulator: QrsSimulator) -> SimState:
    assert simulator.state is not None
    return simulator.state


def qrs_settings_for(sim: QrsSimulator, **overrides: object) -> QrsSettings:
    values: dict[str, object] = {
        "url": sim.url,
        "cert_file": sim.certs.client,
        "key_file": sim.certs.client_key,
        "ca_file": sim.certs.root,
        "timeout_s": 2.0,
        "poll_interval_s": 0.05,
        "retry": RetrySettings(attempts=4, backoff_s=0.01, max_backoff_s=0.05),
    }
    values.update(overrides)
    return QrsSettings.model_validate(values)


@pytest.fixture
async def qrs(simulator: QrsSimulator) -> AsyncIterator[QrsClient]:
    async with QrsClient(qrs_settings_for(simulator)) as client:
        yield client


def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's choice; a test binds it soon)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]], *, timeout: float = 10.0, what: str = "condition"
) -> None:
    """Wait for `check` to hold, polling every 10 ms, failing the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)
