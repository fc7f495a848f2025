"""The QRS client against Sense-like certificates and a JWT virtual proxy, over real TLS."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mqtt_starter.config import QrsSettings
from mqtt_starter.core.errors import QrsAuthError
from mqtt_starter.core.model import Selector, SelectorKind
from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.qrs.fixtures import Fixture
from mqtt_starter.simulators.qrs.server import BadTokenAnswer, QrsSimulator
from mqtt_starter.sites import qrs_token
from mqtt_starter.sites.base import resolve_selectors
from mqtt_starter.sites.qrs import QrsClient
from mqtt_starter.sites.qrs_api import QrsApi, build_ssl_context
from tests.conftest import qrs_settings_for
from tests.sense_certs import write_sense_like_certs

NODE = "sense-node1.corp.example"
SALES = "11111111-1111-4111-8111-111111111111"


@pytest.fixture(scope="module")
def sense_certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return write_sense_like_certs(tmp_path_factory.mktemp("sense-certs"), NODE)


@pytest.fixture
async def sense_sim(sense_certs: CertPaths, task_fixture: Fixture) -> AsyncIterator[QrsSimulator]:
    sim = QrsSimulator(task_fixture, sense_certs)
    await sim.start()
    yield sim
    await sim.stop()


# -- TLS ----------------------------------------------------------------------------------


async def test_a_certificate_naming_only_the_host_fails_with_a_hint(
    sense_sim: QrsSimulator,
) -> None:
    assert sense_sim.url.startswith("https://127.0.0.1:")
    async with QrsClient(qrs_settings_for(sense_sim)) as qrs:
        with pytest.raises(QrsAuthError) as info:
            await qrs.about()
    assert str(info.value) == (
        f"TLS verification of {sense_sim.url} failed: IP address mismatch, certificate is not"
        " valid for '127.0.0.1'.; the certificate does not name '127.0.0.1' (Sense's"
        " certificates name the node's host name): set qrs.server_name to the name it holds,"
        " or qrs.verify_hostname: false to verify the chain only"
    )
    assert sense_sim.state is not None and sense_sim.state.journal == []


@pytest.mark.parametrize(
    "options", [{"server_name": NODE}, {"verify_hostname": False}], ids=["server_name", "chain"]
)
async def test_server_name_or_chain_only_verification_connects(
    sense_sim: QrsSimulator, options: dict[str, Any]
) -> None:
    async with QrsClient(qrs_settings_for(sense_sim, **options)) as qrs:
        assert (await qrs.about())["schemaPath"] == "About"


async def test_a_wrong_server_name_is_still_refused(sense_sim: QrsSimulator) -> None:
    async with QrsClient(qrs_settings_for(sense_sim, server_name="other.corp.example")) as qrs:
        with pytest.raises(QrsAuthError, match=r"set qrs\.server_name to the name it holds"):
            await qrs.about()


async def test_chain_only_verification_still_wants_the_right_root(
    sense_sim: QrsSimulator, certs: CertPaths
) -> None:
    # The test suite's other CA did not sign the Sense-like server certificate.
    settings = qrs_settings_for(sense_sim, verify_hostname=False, ca_file=certs.root)
    async with QrsClient(settings) as qrs:
        with pytest.raises(QrsAuthError, match=r"not signed by qrs\.ca_file"):
            await qrs.about()


def strict_default_context(*args: Any, **kwargs: Any) -> ssl.SSLContext:
    """ssl.create_default_context as Python 3.13 makes it: strict X.509 verification."""
    context = ORIGINAL_DEFAULT_CONTEXT(*args, **kwargs)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


ORIGINAL_DEFAULT_CONTEXT = ssl.create_default_context


async def test_strict_verification_refuses_sense_certificates(
    sense_sim: QrsSimulator, sense_certs: CertPaths
) -> None:
    # What a plain strict client sees: the Sense-like chain is refused.
    context = strict_default_context(cafile=str(sense_certs.root))
    context.load_cert_chain(sense_certs.client, sense_certs.client_key)
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.open_connection(
            "127.0.0.1", sense_sim.port, ssl=context, server_hostname=NODE
        )


async def test_a_pinned_root_is_verified_without_the_strict_flag(
    sense_sim: QrsSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ssl, "create_default_context", strict_default_context)
    settings = qrs_settings_for(sense_sim, server_name=NODE)
    assert not build_ssl_context(settings).verify_flags & ssl.VERIFY_X509_STRICT
    async with QrsClient(settings) as qrs:
        assert (await qrs.about())["schemaPath"] == "About"


def test_the_system_store_keeps_the_strict_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssl, "create_default_context", strict_default_context)
    settings = qrs_settings_for_url("https://sense.example:4242", ca_file=None, auth="jwt", jwt="x")
    assert build_ssl_context(settings).verify_flags & ssl.VERIFY_X509_STRICT


def qrs_settings_for_url(url: str, **values: Any) -> QrsSettings:
    return QrsSettings.model_validate({"url": url, **values})


# -- a JWT virtual proxy --------------------------------------------------------------------


def jwt(exp: float) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part({'sub': 'svc', 'exp': exp})}.c2ln"


TOKEN = jwt(time.time() + 365 * 86400)


async def proxy(
    certs: CertPaths, fixture: Fixture, bad_token: BadTokenAnswer = "redirect"
) -> QrsSimulator:
    sim = QrsSimulator(fixture, certs, prefix="/jwt", token=TOKEN, bad_token=bad_token)
    await sim.start()
    return sim


async def test_a_thousand_calls_use_one_proxy_session(
    certs: CertPaths, task_fixture: Fixture
) -> None:
    sim = await proxy(certs, task_fixture)
    try:
        settings = qrs_settings_for(sim, auth="jwt", jwt=TOKEN, max_concurrency=8)
        async with QrsClient(settings) as qrs:
            answers = await asyncio.gather(*(qrs.about() for _ in range(1000)))
            resolution = await resolve_selectors(qrs, [Selector(SelectorKind.NAME, "Reload Sales")])
        assert {a["schemaPath"] for a in answers} == {"About"}
        assert [r.task.id for r in resolution.tasks] == [SALES]
        assert sim.proxy is not None and len(sim.proxy.sessions) == 1
        assert sim.state is not None
        assert {e.status for e in sim.state.journal} == {200}
        assert len(sim.state.journal) == 1001
    finally:
        await sim.stop()


@pytest.mark.parametrize(
    ("bad_token", "why"),
    [
        ("redirect", "was redirected to /jwt/internal_forms_authentication/?targetId="),
        ("html", "was answered with an HTML page (HTTP 200)"),
        ("401", "HTTP 401 Unauthorized"),
    ],
)
async def test_a_refused_token_is_an_authentication_failure(
    certs: CertPaths, task_fixture: Fixture, bad_token: BadTokenAnswer, why: str
) -> None:
    sim = await proxy(certs, task_fixture, bad_token)
    try:
        wrong = jwt(time.time() + 86400 * 30) + "x"
        attempts: list[int] = []
        async with QrsClient(
            qrs_settings_for(sim, auth="jwt", jwt=wrong),
            observer=lambda op, s, status: attempts.append(status),
        ) as qrs:
            with pytest.raises(QrsAuthError) as info:
                await qrs.about()
        assert why in str(info.value)
        assert wrong not in str(info.value)
        assert len(attempts) == 1  # never retried, never followed
        assert sim.state is not None
        assert [(e.path, e.status) for e in sim.state.journal] == [
            ("/qrs/about", {"redirect": 302, "html": 200, "401": 401}[bad_token])
        ]
    finally:
        await sim.stop()


async def test_jwt_file_is_read_again_when_it_changes(
    certs: CertPaths,
    task_fixture: Fixture,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    logged: list[str],
) -> None:
    monkeypatch.setattr(qrs_token, "TOKEN_CHECK_S", 0.0)
    sim = await proxy(certs, task_fixture)
    token_file = tmp_path / "jwt"
    token_file.write_text("expired.token.here\n")
    try:
        async with QrsClient(qrs_settings_for(sim, auth="jwt", jwt_file=token_file)) as qrs:
            with pytest.raises(QrsAuthError):
                await qrs.about()
            token_file.write_text(TOKEN + "\n")
            os.utime(token_file, (1, 1))  # another mtime, whatever the clock's resolution
            assert (await qrs.about())["schemaPath"] == "About"
        assert "qrs.jwt_file changed: using the new token" in logged
        assert not any(TOKEN in m for m in logged)
    finally:
        await sim.stop()


async def test_a_token_near_its_expiry_is_warned_about(
    certs: CertPaths, task_fixture: Fixture, logged: list[str]
) -> None:
    now = 1_800_000_000.0
    soon = jwt(now + 2 * 86400)
    settings = qrs_settings_for_url("https://127.0.0.1:1", auth="jwt", jwt=soon, ca_file=None)
    async with QrsClient(settings, clock=lambda: now):
        pass
    assert logged == ["the QRS JWT expires at 2027-01-17 08:00 UTC, in 2.0 days: renew it"]


@pytest.mark.parametrize(
    ("site", "url"),
    [
        ("https://sense:4242", "https://sense:4242/qrs/task/full?filter=id%20eq%20x&xrfkey=k"),
        ("https://[::1]:4242", "https://[::1]:4242/qrs/task/full?filter=id%20eq%20x&xrfkey=k"),
        ("https://sense.example.com/jwt", "https://sense.example.com/jwt/qrs/task/full?filter=id%20eq%20x&xrfkey=k"),
    ],
)  # fmt: skip
def test_a_call_url_keeps_the_site_address_and_the_proxy_prefix(site: str, url: str) -> None:
    """Each call's URL is built from the site URL's parts (parsed once): an IPv6 address and a
    virtual proxy's prefix come through whole, and the query is sent as encoded."""
    api = QrsApi(QrsSettings(url=site))
    built = api._url("task/full", {"filter": "id eq x"}, "k")
    assert str(built) == url
    assert built.raw_query_string == "filter=id%20eq%20x&xrfkey=k"
