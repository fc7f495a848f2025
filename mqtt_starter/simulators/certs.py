"""Certificates as the QMC exports them: root.pem, client.pem, client_key.pem (and the server's)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class CertPaths:
    """The simulator's certificate files, as the QMC exports them, and the server's."""

    folder: Path

    @property
    def root(self) -> Path:
        return self.folder / "root.pem"

    @property
    def client(self) -> Path:
        return self.folder / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.folder / "client_key.pem"

    @property
    def server(self) -> Path:
        return self.folder / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.folder / "server_key.pem"

    def all(self) -> tuple[Path, ...]:
        return (self.root, self.client, self.client_key, self.server, self.server_key)


def default_cert_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "mqtt-starter" / "qrs-sim"


def ensure_certificates(folder: Path, hostnames: tuple[str, ...] = ()) -> CertPaths:
    """Reuse the certificates in `folder`, or write a new CA, server and client set there."""
    paths = CertPaths(folder)
    if all(p.exists() for p in paths.all()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="mqtt-starter QRS simulator")
    names = tuple(dict.fromkeys(("localhost", "127.0.0.1", "::1", *hostnames)))
    server = ca.issue_cert(*names)
    client = ca.issue_cert("QlikClient")
    ca.cert_pem.write_to_path(str(paths.root))
    server.cert_chain_pems[0].write_to_path(str(paths.server))
    client.cert_chain_pems[0].write_to_path(str(paths.client))
    for key, path in (
        (server.private_key_pem, paths.server_key),
        (client.private_key_pem, paths.client_key),
    ):
        path.touch(mode=0o600)
        key.write_to_path(str(path))
    return paths
