"""What differs between platforms (ops/platform.py), the config watch and the log file, tested
on Linux by giving each function the platform and environment it would see elsewhere."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath
from typing import Any

import pytest
import uvloop
from loguru import logger

from mqtt_starter.config import LogSettings
from mqtt_starter.ops.config_watch import ConfigWatch
from mqtt_starter.ops.logs import configure_logging, log_file
from mqtt_starter.ops.platform import (
    StopSignals,
    console_attached,
    default_config_path,
    default_log_file,
    loop_factory,
    run,
)
from tests.conftest import LoggedExceptions, restore_logging
from tests.windows_like import WindowsLikeLoop


def test_default_paths_per_platform() -> None:
    windows = {"ProgramData": r"D:\Data"}
    assert default_config_path("win32", windows) == PureWindowsPath(
        r"D:\Data\mqtt-starter\mqtt-starter.yaml"
    )
    assert default_config_path("win32", {}) == PureWindowsPath(
        r"C:\ProgramData\mqtt-starter\mqtt-starter.yaml"
    )
    assert default_log_file(windows) == PureWindowsPath(
        r"D:\Data\mqtt-starter\logs\mqtt-starter.log"
    )
    assert default_config_path("linux", windows) == Path("/etc/mqtt-starter/mqtt-starter.yaml")


def test_the_cli_takes_the_config_path_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mqtt_starter.cli import default_config

    monkeypatch.setenv("MQTT_STARTER_CONFIG", "/config/mqtt-starter.yaml")
    assert default_config() == Path("/config/mqtt-starter.yaml")
    monkeypatch.delenv("MQTT_STARTER_CONFIG")
    assert default_config() == Path("/etc/mqtt-starter/mqtt-starter.yaml")


def test_the_event_loop_per_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    # paho needs add_reader/add_writer: on Windows the selector loop, never the proactor.
    assert loop_factory("win32") is asyncio.SelectorEventLoop
    monkeypatch.delenv("MQTT_STARTER_LOOP", raising=False)
    assert loop_factory("linux") is uvloop.new_event_loop
    monkeypatch.setenv("MQTT_STARTER_LOOP", "asyncio")
    assert loop_factory("linux") is asyncio.new_event_loop

    async def which() -> str:
        return type(asyncio.get_running_loop()).__name__

    assert run(which(), "win32") == "_UnixSelectorEventLoop"  # Windows' would be its own
    assert run(which(), "linux") == "_UnixSelectorEventLoop"
    monkeypatch.delenv("MQTT_STARTER_LOOP")
    assert run(which(), "linux") == "Loop"  # uvloop's


def test_a_console_is_attached_unless_stderr_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    assert console_attached("linux")
    monkeypatch.setattr("sys.stderr", None)
    assert not console_attached("linux")
    assert not console_attached("win32")


@pytest.fixture
def restored_signals() -> Iterator[None]:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


async def signalled(*sigs: signal.Signals) -> list[str]:
    """What StopSignals hands on when this process is sent `sigs`, one after the other (each
    handed on before the next is sent: a signal may reach another thread of the process)."""
    got: list[str] = []
    arrived = asyncio.Event()

    def note(what: str) -> None:
        got.append(what)
        arrived.set()

    signals = StopSignals(asyncio.get_running_loop(), lambda: note("stop"), lambda: note("reload"))
    signals.install()
    try:
        for sig in sigs:
            arrived.clear()
            os.kill(os.getpid(), sig)
            await asyncio.wait_for(arrived.wait(), 30)
    finally:
        signals.remove()
    return got


@pytest.mark.usefixtures("restored_signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signals_without_add_signal_handler(sig: signal.Signals) -> None:
    """On a loop that refuses signal handlers the `signal` module catches the stop and hands
    it to the loop; the handlers before are restored after."""
    before = signal.getsignal(sig)
    with asyncio.Runner(loop_factory=WindowsLikeLoop) as runner:
        assert runner.run(signalled(sig)) == ["stop"]
    assert signal.getsignal(sig) is before


def test_stop_signals_through_the_loop_where_it_can() -> None:
    assert asyncio.run(signalled(signal.SIGHUP, signal.SIGTERM)) == ["reload", "stop"]
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


# -- watch_config ------------------------------------------------------------------------------


class Watched:
    def __init__(self, path: Path) -> None:
        path.write_text("a: 1\n")
        self.path = path
        self.changes = 0
        self.enabled = True
        self.watch = ConfigWatch(path, self.changed, enabled=lambda: self.enabled)
        self.previous = self.stamp()

    def changed(self) -> None:
        self.changes += 1

    def stamp(self) -> tuple[int, int, int] | None:
        try:
            info = self.path.stat()
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size, info.st_ino)

    def poll(self) -> bool:
        stamp = self.stamp()
        acted = self.watch.poll(stamp, self.previous)
        self.previous = stamp
        return acted

    def write(self, text: str, mtime_ns: int) -> None:
        self.path.write_text(text)
        os.utime(self.path, ns=(mtime_ns, mtime_ns))


def test_a_change_is_read_once_the_file_stood_still_for_one_poll(tmp_path: Path) -> None:
    w = Watched(tmp_path / "c.yaml")
    assert not w.poll()
    w.write("a: 2\n", 10**18)
    assert not w.poll()  # still being written, perhaps
    w.write("a: 2\nb: 3\n", 10**18 + 1)
    assert not w.poll()
    assert w.poll()  # stood still: read
    assert w.changes == 1
    assert not w.poll()
    assert w.changes == 1


def test_the_same_contents_reload_nothing_and_a_disabled_watch_waits(tmp_path: Path) -> None:
    w = Watched(tmp_path / "c.yaml")
    w.write("a: 1\n", 10**18)  # touched: same contents
    assert not w.poll()
    assert not w.poll()
    w.enabled = False
    w.write("a: 5\n", 10**18 + 5)
    assert not w.poll()
    assert not w.poll()
    w.enabled = True  # watch_config switched on by a reload: the change is read now
    assert w.poll()
    assert w.changes == 1


def test_a_file_that_is_gone_keeps_the_configuration_and_is_said_once(
    tmp_path: Path, log_lines: list[str]
) -> None:
    w = Watched(tmp_path / "c.yaml")
    w.path.unlink()
    assert not w.poll()
    assert not w.poll()
    assert log_lines == [f"watch_config: {w.path} is gone; the running configuration stays"]
    w.write("a: 7\n", 10**18)
    assert not w.poll()
    assert w.poll()
    assert w.changes == 1


async def test_the_watch_runs_on_its_own(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("a: 1\n")
    changed = asyncio.Event()
    watch = ConfigWatch(path, changed.set, interval_s=0.01)
    task = asyncio.create_task(watch.run())
    path.write_text("a: 2\n")
    await asyncio.wait_for(changed.wait(), 30)
    task.cancel()


# -- the log file ------------------------------------------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m.record["message"]), level="DEBUG")
    yield lines
    logger.remove(sink)


@pytest.fixture
def logging_restored() -> Iterator[None]:
    yield
    restore_logging()


def test_without_a_console_the_log_goes_to_the_platform_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert log_file(LogSettings(), console=True) is None
    assert log_file(LogSettings(file=tmp_path / "x.log"), console=True) == tmp_path / "x.log"
    assert log_file(LogSettings(), console=False) is None  # POSIX: no folder guessed
    monkeypatch.setattr("sys.platform", "win32")
    assert log_file(LogSettings(), console=False) == Path(default_log_file())


@pytest.mark.usefixtures("logging_restored")
@pytest.mark.parametrize("form", ["text", "json"])
def test_the_log_file_rotates_and_keeps_so_many(
    tmp_path: Path, form: str, logged_exceptions: LoggedExceptions
) -> None:
    logged_exceptions.expect()  # the traceback below is logged on purpose
    path = tmp_path / "logs" / "mqtt-starter.log"
    configure_logging(
        LogSettings(file=path, format=form, rotate_mb=0.002, keep_files=2), console=False
    )
    for n in range(60):
        logger.info("line {} {}", n, "x" * 60)
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("with a traceback")
    configure_logging(LogSettings(level="DEBUG"))  # closes the file
    files = sorted(p.name for p in path.parent.iterdir())
    assert len(files) == 3  # the current file and two rotated ones
    assert "mqtt-starter.log" in files
    last = path.read_text("utf-8").splitlines()
    every = [text for p in path.parent.iterdir() for text in p.read_text("utf-8").splitlines()]
    if form == "json":
        record: dict[str, Any] = json.loads(last[-1])
        assert record["message"] == "with a traceback"
        assert record["exception"].endswith("ValueError: boom")
        assert any(json.loads(text)["message"].startswith("line ") for text in every)
    else:
        stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}"
        assert any(re.fullmatch(stamp + r" INFO    line \d+ x{60}", text) for text in every)
        assert any(" ERROR   with a traceback" in text for text in last)
        assert last[-1] == "ValueError: boom"
