"""Corporate networks reach Qlik Cloud through a proxy: HTTPS_PROXY and NO_PROXY are honoured,
with a real CONNECT proxy on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from mqtt_starter.core.errors import QrsAuthError
from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.sites.cloud import CloudClient
from tests.shell.test_cloud_client import site, tenant


class ConnectProxy:
    """An HTTP proxy that serves CONNECT tunnels and remembers where they went."""

    def __init__(self) -> None:
        self.tunnels: list[str] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            writer.close()
            return
        self.tunnels.append(target)
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def __aenter__(self) -> ConnectProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def proxy() -> AsyncIterator[ConnectProxy]:
    async with ConnectProxy() as p:
        yield p


@pytest.mark.parametrize("bypass", [False, True])
async def test_https_proxy_from_the_environment(
    certs: CertPaths, proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch, bypass: bool
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    if bypass:
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    async with site(certs, tenant()) as (client, state):
        await client.about()
        sim_port = client.settings.tenant_url.rsplit(":", 1)[1]
        assert proxy.tunnels == ([] if bypass else [f"127.0.0.1:{sim_port}"])
        assert [e.path for e in state.journal] == ["/api/v1/items"]


async def test_a_private_ca_is_trusted_only_when_configured(certs: CertPaths) -> None:
    # The simulator's CA stands for a TLS-inspecting proxy's: without cloud.ca_file, the
    # system store does not know it, and the error says which key to set.
    async with site(certs, tenant()) as (client, _):
        strict = CloudClient(client.settings.model_copy(update={"ca_file": None}))
        await strict.start()
        try:
            with pytest.raises(QrsAuthError, match=r"cloud\.ca_file"):
                await strict.about()
        finally:
            await strict.close()
