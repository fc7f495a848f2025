"""A screenshot of the status page during the demo, for the docs.

    .venv/bin/python scripts/status_page_screenshot.py docs/status-page.png

Runs `mqtt-starter demo`, waits until its tour is over (a long run is still going, a scheduled
run has failed), opens the page in headless Chromium (scripts/setup.sh test installs it) and
saves the screenshot; then stops the demo.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait


def main(target: Path) -> int:
    demo = subprocess.Popen(
        [sys.executable, "-m", "mqtt_starter", "demo", "--port", "0"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    assert demo.stdout is not None
    page = None
    for line in demo.stdout:
        found = re.match(r"status page: (\S+)", line)
        page = found.group(1) if found else page
        if line.startswith("The demo keeps running"):
            break
    if page is None:
        demo.kill()
        print("the demo printed no status page", file=sys.stderr)
        return 1
    os.environ["SE_OFFLINE"] = "true"
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile:
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update",
                     "--window-size=1400,1200", f"--user-data-dir={profile}"):  # fmt: skip
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        try:
            driver.get(page)
            WebDriverWait(driver, 20).until(lambda d: d.find_element("id", "live").text == "live")
            driver.save_screenshot(str(target))
        finally:
            driver.quit()
    demo.send_signal(signal.SIGINT)
    demo.communicate(timeout=30)
    print(f"saved {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/status-page.png")))
