"""The wheel and the container image, built and run for real (DESIGN section 12).

The wheel is built with `python -m build` and installed into a new virtual environment from
the wheels of its runtime dependencies only. The image is built with podman from the
Containerfile, on a base made from Debian's packages (mmdebstrap, `podman import`: no image
registry is reachable where the suite runs), and run against the test broker and the simulator.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mqtt_starter import __version__
from mqtt_starter.config import load_settings
from mqtt_starter.simulators.qrs.server import QrsSimulator
from mqtt_starter.simulators.qrs.state import SimState
from tests.conftest import free_port, wait_until
from tests.integration import helpers
from tests.integration.conftest import Broker, Client, daemon_config
from tests.integration.helpers import SALES

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = "localhost/mqtt-starter-test-base:bookworm"
# podman on these machines: runc (the default runtime fails on the cgroup layout), cgroupfs,
# and explicit rlimits.
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs", "--events-backend=file"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]

# Building the wheels, the image and virtual environments takes most of a minute.
pytestmark = pytest.mark.slow


def sh(*args: str | Path, timeout: float = 600, check: bool = True) -> str:
    result = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/: the project's wheel (python -m build) and the wheels of its runtime dependencies."""
    dist = tmp_path_factory.mktemp("dist")
    sh(sys.executable, "-m", "build", "--wheel", "--outdir", dist, ROOT)
    [wheel] = dist.glob("mqtt_starter-*.whl")
    assert wheel.name == f"mqtt_starter-{__version__}-py3-none-any.whl"
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", dist, wheel)
    return dist


async def test_the_wheel_installs_alone_and_checks_a_site(
    wheels: Path, tmp_path: Path, broker: Broker, simulator: QrsSimulator
) -> None:
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    sh(venv / "bin/pip", "install", "-q", "--no-index", "--find-links", wheels, "mqtt-starter")
    assert sh(venv / "bin/mqtt-starter", "--version") == f"mqtt-starter {__version__}\n"
    for tool in ("pytest", "hypothesis", "selenium"):
        found = sh(
            venv / "bin/python", "-c", f"import importlib.util as u; print(u.find_spec({tool!r}))"
        )
        assert found == "None\n", f"{tool} is installed with the wheel"
    config = tmp_path / "mqtt-starter.yaml"
    config.write_text(yaml.safe_dump(daemon_config(broker, simulator)))
    # In a thread: the simulator and the broker's test side answer on this test's event loop.
    out = await asyncio.to_thread(sh, venv / "bin/mqtt-starter", "check", "-c", config)
    assert out.splitlines()[-1] == "everything works"
    assert f"broker 127.0.0.1:{broker.port}" in out


def test_pipx_installs_the_wheel_as_a_command(wheels: Path, tmp_path: Path) -> None:
    """`pipx install` of the wheel (pipx's own pip comes from the index; the wheel's
    dependencies from the same folder, or the index)."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "PIPX_HOME": str(tmp_path / "pipx"),
        "PIPX_BIN_DIR": str(tmp_path / "bin"),
    }
    [wheel] = wheels.glob("mqtt_starter-*.whl")
    pip_args = f"--find-links {wheels}"
    result = subprocess.run(
        [sys.executable, "-m", "pipx", "install", "--pip-args", pip_args, str(wheel)],
        capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert sh(tmp_path / "bin/mqtt-starter", "--version") == f"mqtt-starter {__version__}\n"


# -- the container image -----------------------------------------------------------------------


def podman(*args: str | Path, timeout: float = 600, check: bool = True) -> str:
    return sh(*PODMAN, *args, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def image(wheels: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    for tool in ("podman", "mmdebstrap", "runc"):
        assert shutil.which(tool), f"{tool} is not installed: scripts/setup.sh installs it"
    if not _exists(BASE_IMAGE):
        base = tmp_path_factory.mktemp("base") / "base.tar"
        sh(
            "mmdebstrap",
            "--variant=apt",
            "--include=python3,python3-venv,ca-certificates",
            '--aptopt=Acquire::Check-Valid-Until "false"',
            "bookworm",
            base,
            "http://deb.debian.org/debian",
        )
        podman("import", base, BASE_IMAGE)
        base.unlink()
    context = tmp_path_factory.mktemp("context")
    shutil.copytree(wheels, context / "dist")
    shutil.copy(ROOT / ".containerignore", context)
    tag = f"localhost/mqtt-starter:test-{uuid.uuid4().hex[:8]}"
    podman(
        "build", "--format", "docker", *LIMITS, "-f", ROOT / "Containerfile",
        "--build-arg", f"BASE={BASE_IMAGE}",
        "--build-arg", "PIP_NO_INDEX=1", "--build-arg", "PIP_FIND_LINKS=/tmp/wheels",
        "-t", tag, context,
    )  # fmt: skip
    yield tag
    podman("rmi", "-f", tag, check=False)


def _exists(name: str) -> bool:
    return subprocess.run([*PODMAN, "image", "exists", name], check=False).returncode == 0


class Container:
    def __init__(self, image: str) -> None:
        self.image = image
        self.name = f"mqtt-starter-test-{uuid.uuid4().hex[:8]}"

    async def run(self, *args: str | Path) -> None:
        await asyncio.to_thread(
            podman, "run", "-d", "--name", self.name, "--network", "host", *LIMITS, *args,
            self.image,
        )  # fmt: skip

    async def healthy(self) -> bool:
        rc = await asyncio.to_thread(
            subprocess.run, [*PODMAN, "healthcheck", "run", self.name], capture_output=True
        )
        return rc.returncode == 0

    def inspect(self) -> dict[str, Any]:
        [info] = json.loads(podman("inspect", self.name))
        state: dict[str, Any] = info["State"]
        return state

    def logs(self) -> str:
        result = subprocess.run([*PODMAN, "logs", self.name], capture_output=True, text=True)
        return result.stdout + result.stderr

    def remove(self) -> None:
        podman("rm", "-f", self.name, check=False)


def readable_copy(folder: Path, files: dict[str, Path]) -> Path:
    """Files the container's unprivileged user can read (pytest's folders are root's, 0700)."""
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    for name, source in files.items():
        shutil.copy(source, folder / name)
        (folder / name).chmod(0o644)
    return folder


async def test_the_image_becomes_healthy_starts_a_task_and_stops_gracefully(
    image: str, tmp_path: Path, broker: Broker, simulator: QrsSimulator, sim_state: SimState
) -> None:
    certs = simulator.certs
    cert_dir = readable_copy(
        tmp_path / "certs",
        {"client.pem": certs.client, "client_key.pem": certs.client_key, "root.pem": certs.root},
    )
    config = daemon_config(
        broker, simulator, http={"enabled": True, "port": free_port(), "token": "c0ntainer"}
    )
    config["mqtt"]["client_id"] = "starter-container"
    config["qrs"].update(
        cert_file="/certs/client.pem", key_file="/certs/client_key.pem", ca_file="/certs/root.pem"
    )
    config_dir = tmp_path / "config"
    config_dir.mkdir(mode=0o755)
    config_dir.chmod(0o755)
    (config_dir / "mqtt-starter.yaml").write_text(yaml.safe_dump(config))
    (config_dir / "mqtt-starter.yaml").chmod(0o644)

    container = Container(image)
    try:
        await container.run("-v", f"{config_dir}:/config:ro", "-v", f"{cert_dir}:/certs:ro")
        try:
            await wait_until(container.healthy, timeout=90, what="the container to be healthy")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{container.logs()}") from None
        assert container.inspect()["Running"]
        async with Client(broker) as client:
            answer = await client.request(
                f"{helpers.BASE}/start/id/{SALES}", {"requestId": "in-podman"}
            )
            assert answer["status"] == "ok"
            assert [t["result"] for t in answer["tasks"]] == ["started"]
            assert sim_state.started == [SALES]
            await client.subscribe(f"{helpers.BASE}/availability/starter-container")
            [online] = await client.wait_for(f"{helpers.BASE}/availability/starter-container")
            assert online.payload == b"online"
            await asyncio.to_thread(podman, "stop", "-t", "30", container.name)
            await wait_until(
                lambda: (
                    [m.payload for m in client.on(f"{helpers.BASE}/availability/#")][-1:]
                    == [b"offline"]
                ),
                what="offline",
            )
        state = container.inspect()
        assert (state["Running"], state["ExitCode"]) == (False, 0), container.logs()
        log = container.logs()
        assert "stopping: finishing requests in flight" in log
        assert "Traceback" not in log
        assert "c0ntainer" not in log
    finally:
        container.remove()


async def test_the_image_without_a_configuration_exits_78_naming_it(image: str) -> None:
    container = Container(image)
    try:
        await container.run()
        await wait_until(lambda: not container.inspect()["Running"], timeout=60, what="exit")
        assert container.inspect()["ExitCode"] == 78
        assert container.logs() == (
            "mqtt-starter: invalid configuration:\n"
            "  no configuration file at /config/mqtt-starter.yaml (-c or MQTT_STARTER_CONFIG"
            " names another)\n"
        )
    finally:
        container.remove()


def test_compose_runs_the_image_with_the_demo_under_its_profile() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert sorted(services) == ["mosquitto", "mqtt-starter", "qrs-simulator"]
    assert services["qrs-simulator"]["profiles"] == ["demo"]
    assert "profiles" not in services["mqtt-starter"]
    assert services["qrs-simulator"]["image"] == services["mqtt-starter"]["image"]
    demo = load_settings(ROOT / "container/mqtt-starter.yaml", {})
    assert demo.qrs is not None
    assert demo.qrs.url == "https://qrs-simulator:4242"
    assert "--cert-name" in services["qrs-simulator"]["command"]
