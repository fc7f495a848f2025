"""The layout's rules that import-linter does not state (its contracts are in .importlinter and
run in CI: layers, the core importing nothing of ours, the simulators nothing of the client
side): the core does no I/O, and one module owns each foreign library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "mqtt_starter"
IO_LIBRARIES = {
    "asyncio",
    "aiohttp",
    "aiomqtt",
    "paho",
    "loguru",
    "pydantic",
    "yaml",
    "socket",
    "ssl",
    "prometheus_client",
    "trustme",
}


def imports(path: Path) -> set[str]:
    """The top-level names of every module `path` imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def owners(library: str) -> set[str]:
    return {p.relative_to(PACKAGE).as_posix() for p in modules(PACKAGE) if library in imports(p)}


@pytest.mark.parametrize("path", modules(PACKAGE / "core"), ids=lambda p: p.name)
def test_the_core_does_no_io(path: Path) -> None:
    assert not imports(path) & IO_LIBRARIES


@pytest.mark.parametrize(
    ("library", "owner"),
    # aiomqtt is the tests' own MQTT client; the daemon drives paho itself.
    [("aiomqtt", set()), ("paho", {"mqtt/link.py"})],
)
def test_one_module_owns_each_foreign_library(library: str, owner: set[str]) -> None:
    assert owners(library) == owner


def test_the_http_client_lives_in_the_transport() -> None:
    # aiohttp's server side serves the HTTP door, the simulators and the demo's webhook
    # receiver; its client only the one
    # transport both sites share, and the webhooks (receivers are not sites: no token, no
    # site errors, their own retry rules).
    assert owners("aiohttp") == {
        "sites/http.py",
        "ops/webhooks.py",
        "commands/demo.py",
        "doors/http.py",
        "doors/butler_rest.py",
        "doors/status_page.py",
        "simulators/qrs/server.py",
        "simulators/cloud/server.py",
    }
