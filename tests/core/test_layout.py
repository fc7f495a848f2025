"""The layout's rules, checked on the source: the core does no I/O, one module owns each
foreign library, and the simulator shares no code with the client side."""

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
    """Top-level names of absolute imports, and `.x` for relative ones."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                names.add("." * node.level + (node.module or ""))
            elif node.module:
                names.add(node.module.split(".")[0])
    return names


def modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", modules(PACKAGE / "core"), ids=lambda p: p.name)
def test_the_core_does_no_io_and_imports_only_the_core(path: Path) -> None:
    names = imports(path)
    assert not names & IO_LIBRARIES
    assert all(not n.startswith("..") for n in names), "the core imports nothing from the shells"


@pytest.mark.parametrize(
    ("library", "owners"),
    [
        ("aiomqtt", {"mqtt_link.py"}),
        ("paho", {"mqtt_link.py"}),
    ],
)
def test_one_module_owns_each_foreign_library(library: str, owners: set[str]) -> None:
    users = {p.name for p in modules(PACKAGE) if library in imports(p)}
    assert users == owners


def test_the_http_client_lives_in_the_site_clients() -> None:
    # aiohttp's server side serves the HTTP door and the simulators; its client only the one
    # transport both sites share.
    users = {p.relative_to(PACKAGE).as_posix() for p in modules(PACKAGE) if "aiohttp" in imports(p)}
    assert users == {
        "transport.py",
        "http_api.py",
        "simulator/server.py",
        "cloud_sim/server.py",
    }


@pytest.mark.parametrize("folder", ["simulator", "cloud_sim"])
def test_the_simulators_share_nothing_with_the_client_side(folder: str) -> None:
    # The Cloud simulator may use the QRS simulator's certificates, journal and faults.
    for path in modules(PACKAGE / folder):
        names = imports(path)
        assert all(not n.startswith("..") or n.startswith("..simulator") for n in names), path.name
