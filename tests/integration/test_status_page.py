"""The status page in a real headless browser (Debian's Chromium and ChromeDriver, driven by
Selenium; nothing is downloaded), with the daemon, a real broker and the QRS simulator; and
its HTTP side (snapshot, events, token, headers) with a plain HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from selenium import webdriver
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from mqtt_starter.simulators.certs import CertPaths
from mqtt_starter.simulators.qrs.fixtures import Fixture, Outcome, TaskFixture
from mqtt_starter.simulators.qrs.server import QrsSimulator
from tests.conftest import free_port, wait_until
from tests.integration import helpers
from tests.integration.conftest import Broker, Client, LocalDaemon, daemon_config, daemons
from tests.receiver import Receiver, receiving

ORDERS = "2a000000-0000-4000-8000-000000000001"
EVIL = "2a000000-0000-4000-8000-000000000002"
EVIL_NAME = "<img src=x onerror=alert(1)>"
TOKEN = "page-token-1"
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and shutil.which(DRIVER)),
    reason="Chromium and ChromeDriver come with scripts/setup.sh test",
)


@pytest.fixture
async def simulator(certs: CertPaths) -> AsyncIterator[QrsSimulator]:
    fixture = Fixture(
        tasks=[
            TaskFixture(id=ORDERS, name="Reload Orders", tags=["Nightly"],
                        outcome=Outcome(duration_s=3600)),
            TaskFixture(id=EVIL, name=EVIL_NAME, tags=["<b>bold</b>"],
                        outcome=Outcome(duration_s=0.2, result="fail",
                                        message="<script>alert(2)</script>")),
        ]
    )  # fmt: skip
    sim = QrsSimulator(fixture, certs)
    await sim.start()
    yield sim
    await sim.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with receiving() as got:
        yield got


@pytest.fixture
async def page_daemon(
    broker: Broker, simulator: QrsSimulator, receiver: Receiver
) -> AsyncIterator[str]:
    """A daemon with the endpoint (and its token), the monitor on, and a webhook; its base
    URL."""
    port = free_port()
    async with daemons(
        LocalDaemon, lambda **sections: daemon_config(broker, simulator, **sections)
    ) as make:
        await make(
            http={"enabled": True, "port": port, "token": TOKEN},
            monitor={"enabled": True, "interval_s": 0.2, "overlap_s": 2},
            alerts={"webhooks": [{"name": "ops", "url": receiver.url}]},
        )
        yield f"http://127.0.0.1:{port}"


class Browser:
    """Selenium is blocking: every call runs in a thread, so the daemon (in this event loop)
    keeps serving while the browser waits for it."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver

    async def __call__(self, call: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(call, *args)

    async def get(self, url: str) -> None:
        await self(self.driver.get, url)

    async def text(self, css: str) -> str:
        def read() -> str:
            return "\n".join(e.text for e in self.driver.find_elements(By.CSS_SELECTOR, css))

        return str(await self(read))

    async def click(self, css: str) -> None:
        """Click the first element `css` finds. Wait first for what the page still has to
        draw there: an element drawn anew between the find and the click is stale."""
        await self(lambda: self.driver.find_element(By.CSS_SELECTOR, css).click())

    async def script(self, code: str) -> Any:
        return await self(self.driver.execute_script, code)

    async def wait_text(self, css: str, wanted: str, timeout: float = 20) -> None:
        async def shown() -> bool:
            return wanted in await self.text(css)

        await wait_until(shown, timeout=timeout, what=f"{wanted!r} in {css}")


@pytest.fixture(scope="module")
def chrome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    """One Chromium for the module (starting one costs seconds); each test gets it clean."""
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium")
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1400,1000", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser(chrome: webdriver.Chrome) -> Iterator[Browser]:
    """The module's browser with no page open and no cookie of an earlier test."""
    # Cookies are not kept per port: an earlier daemon's session cookie would be sent to this
    # test's daemon. Cleared for every site (the DevTools call), not only the current page's.
    chrome.get("about:blank")
    chrome.execute_cdp_cmd("Network.clearBrowserCookies", {})
    yield Browser(chrome)
    chrome.get("about:blank")  # close the page's event stream before its daemon stops


async def open_page(browser: Browser, base: str) -> None:
    await browser.get(f"{base}/?token={TOKEN}")
    await browser.wait_text("#live", "live")
    # The token went into a cookie; the address bar shows the page without it.
    assert browser.driver.current_url == f"{base}/"
    await browser.script("window.loadedOnce = 42")


async def test_requests_and_runs_appear_live(
    page_daemon: str, browser: Browser, mqtt: Client, tmp_path: Path, sim_state: Any
) -> None:
    await open_page(browser, page_daemon)
    assert "connected" in await browser.text("#broker")
    await mqtt.request(f"{helpers.BASE}/start/id/{ORDERS}", {"requestId": "page-1"})
    await browser.wait_text("#requests", "page-1")
    row = await browser.text("#requests tr.request")
    assert (
        "mqtt" in row
        and f"{helpers.BASE}/start/id/{ORDERS}" in row
        and "Reload Orders started" in row
    )
    await browser.wait_text("#runs", "Started")
    assert "mqtt-starter (page-1)" in await browser.text("#runs")
    # The run ends (when the test says so, not after a time): it leaves the runs in progress
    # and the task shows its last state.
    sim_state.stop(sim_state.tasks[ORDERS])
    await browser.wait_text("#runs", "nothing running")
    await browser.wait_text("#tasks", "Aborted")
    # The follow-up completes the request's row (drawing it anew: it is clicked only after).
    await browser.wait_text("#requests tr.request", "error (finished)")  # the run was aborted
    assert "Reload Orders started → Aborted" in await browser.text("#requests tr.request")
    # Details on demand: a click shows the request's reply, as its follow-up completed it.
    await browser.click("#requests tr.request")
    details = json.loads(await browser.text("pre.details"))
    assert (details["requestId"], details["stage"], details["status"]) == (
        "page-1",
        "finished",
        "error",
    )
    assert (details["tasks"][0]["result"], details["tasks"][0]["state"]) == ("started", "Aborted")
    assert await browser.script("return window.loadedOnce") == 42  # never reloaded
    await browser(browser.driver.save_screenshot, str(tmp_path / "status-page.png"))


async def test_each_webhooks_deliveries_are_shown_without_its_url(
    page_daemon: str, browser: Browser, receiver: Receiver, sim_state: Any
) -> None:
    await open_page(browser, page_daemon)
    receiver.answers = [400]
    sim_state.fire(sim_state.tasks[EVIL])
    await browser.wait_text(
        "#webhooks", "ops: 0 delivered, 1 failed (last: HTTP 400: no such channel)"
    )
    sim_state.fire(sim_state.tasks[EVIL])
    await browser.wait_text("#webhooks", "ops: 1 delivered, 1 failed")
    assert "t0ken" not in await browser.text("header")  # the URL's secret part


async def test_what_publishers_send_is_shown_as_text(
    page_daemon: str, browser: Browser, mqtt: Client
) -> None:
    await open_page(browser, page_daemon)
    await mqtt.request(
        f"{helpers.BASE}/start/tag/%3Cb%3Ebold%3C%2Fb%3E", {"requestId": "<i>id</i>"}
    )
    await browser.wait_text("#requests", f"{EVIL_NAME} started")
    await browser.wait_text("#tasks", "FinishedFail")
    assert "<i>id</i>" in await browser.text("#requests")
    tasks = await browser.text("#tasks")
    assert EVIL_NAME in tasks and "<b>bold</b>" in tasks and "<script>alert(2)</script>" in tasks
    # The filter finds it by tag, as text.
    field = browser.driver.find_element(By.ID, "filter")
    await browser(field.send_keys, "<b>")
    await browser.wait_text("#tasks-count", "1 of 1")
    assert await browser(browser.driver.find_elements, By.TAG_NAME, "img") == []
    assert await browser(browser.driver.find_elements, By.CSS_SELECTOR, "#tasks b, #tasks i") == []
    with pytest.raises(NoAlertPresentException):
        await browser(lambda: browser.driver.switch_to.alert.text)


async def test_without_the_token_the_page_is_refused(page_daemon: str, browser: Browser) -> None:
    for url in (f"{page_daemon}/", f"{page_daemon}/?token=wrong", f"{page_daemon}/events"):
        await browser.get(url)
        body = await browser.text("body")
        assert json.loads(body) == {
            "code": "unauthorized",
            "message": "a valid bearer token is required",
        }
        assert await browser(browser.driver.find_elements, By.ID, "requests") == []


async def test_snapshot_events_and_headers(page_daemon: str, mqtt: Client) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{page_daemon}/", headers=headers) as page:
            assert page.status == 200
            policy = page.headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
            assert "'unsafe-inline'" not in policy
            html = await page.text()
            # Nothing is fetched from elsewhere: no external script, style, font or image.
            assert not [w for w in ("src=", "href=", "@import", "url(") if w in html]
        async with session.get(f"{page_daemon}/events", headers=headers) as events:
            assert events.headers["Content-Type"] == "text/event-stream"
            first = await events.content.readuntil(b"\n\n")
            assert first.startswith(b"event: snapshot\ndata: ")
            snapshot = json.loads(first.split(b"data: ", 1)[1])
            assert snapshot["instance"]["instance"] == helpers.INSTANCE
            await mqtt.request(f"{helpers.BASE}/start/id/{ORDERS}", {"requestId": "sse-1"})

            async def request_event() -> dict[str, Any]:
                while True:
                    chunk = await events.content.readuntil(b"\n\n")
                    if chunk.startswith(b"event: change"):
                        change = json.loads(chunk.split(b"data: ", 1)[1])
                        if change["kind"] == "request":
                            return dict(change["data"])

            entry = await asyncio.wait_for(request_event(), 20)
            assert (entry["door"], entry["requestId"], entry["status"]) == ("mqtt", "sse-1", "ok")
        async with session.get(f"{page_daemon}/status.json", headers=headers) as status:
            data = await status.json()
            assert [r["requestId"] for r in data["requests"]] == ["sse-1"]


# -- pages of other sites cannot start tasks (DESIGN.md section 3) -------------------------------

ATTACK = """<!DOCTYPE html><html><body>
<iframe name="sink" id="sink"></iframe>
<form id="form" method="post" target="sink" action="{target}"></form>
<script>
let left = 3;
function one() {{ left -= 1; if (left === 0) document.title = "done"; }}
document.getElementById("sink").addEventListener("load", one, {{once: true}});
document.getElementById("form").submit();
fetch("{target}", {{method: "POST", mode: "no-cors", credentials: "include",
                    body: "[]"}}).then(one, one);
fetch("{target}", {{method: "PUT", mode: "no-cors", credentials: "include"}}).then(one, one);
</script></body></html>"""


@contextlib.asynccontextmanager
async def attacker(host: str, target: str) -> AsyncIterator[str]:
    """A page on `host` (another port, or another site) that posts a form to `target` and
    sends two no-cors fetches to it, with credentials; its title says when all three ended."""

    async def page(_: web.Request) -> web.Response:
        return web.Response(text=ATTACK.format(target=target), content_type="text/html")

    app = web.Application()
    app.router.add_get("/", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://{host}:{port}/"
    finally:
        await runner.cleanup()


async def attacked(browser: Browser, page: str) -> None:
    await browser.get(page)
    await wait_until(
        lambda: browser(lambda: browser.driver.title == "done"), what="the attack to end"
    )


async def test_a_same_site_page_cannot_start_a_task_with_the_page_cookie(
    page_daemon: str, browser: Browser, sim_state: Any
) -> None:
    await open_page(browser, page_daemon)  # the browser holds the page's cookie
    async with attacker("127.0.0.1", f"{page_daemon}/v4/reloadtask/{ORDERS}/start") as page:
        await attacked(browser, page)
    assert sim_state.started == []


async def test_a_cross_site_page_cannot_start_a_task_without_a_token(
    broker: Broker, simulator: QrsSimulator, browser: Browser, sim_state: Any
) -> None:
    port = free_port()
    async with daemons(
        LocalDaemon, lambda **sections: daemon_config(broker, simulator, **sections)
    ) as make:
        daemon: LocalDaemon = await make(http={"enabled": True, "port": port})
        target = f"http://127.0.0.1:{port}/v4/reloadtask/{ORDERS}/start"
        async with attacker("localhost", target) as page:
            await attacked(browser, page)
        assert sim_state.started == []
        # The form and the no-cors POST reached the daemon and were refused; a no-cors PUT
        # the browser does not even send.
        refusals = [line for line in daemon.lines if line.startswith("request http")]
        assert len(refusals) == 2 and all("-> error forbidden" in r for r in refusals), refusals
        assert (
            f"http.token is not set: anyone who reaches 127.0.0.1:{port} can start tasks and"
            " read the status page"
        ) in daemon.lines
