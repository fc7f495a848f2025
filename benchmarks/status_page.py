"""The status page's cost: the daemon's RSS and CPU with 100 pages open during 10,000 requests,
against none open; and its RSS with 1,000 pages open.

    python -m benchmarks.status_page [--quick] [--out DIR]

A private mosquitto, the QRS simulator (a process) and the daemon with its HTTP endpoint on.
Pages are Server-Sent Events connections (`GET /events`, what the page's script opens), each
read to the end of every event as a browser would. Each run sends the same requests, 50 in
flight. Writes status_page.json and status_page.md into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp

from .harness import (
    Broker,
    Simulator,
    Target,
    cpu_s,
    driving,
    free_port,
    rss_mib,
    running,
    workspace,
)
from .run import id_topics, load_tasks


class Pages:
    """`count` open pages in a thread of their own, each reading every event it is sent."""

    def __init__(self, url: str, count: int) -> None:
        self.url = url
        self.count = count
        self.events = 0
        self.open = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _page(self, session: aiohttp.ClientSession, opened: list[int]) -> None:
        async with session.get(self.url) as response:
            opened.append(1)
            if len(opened) == self.count:
                self.open.set()
            async for _ in response.content.iter_any():
                self.events += 1

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        opened: list[int] = []
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            pages = [asyncio.create_task(self._page(session, opened)) for _ in range(self.count)]
            if not pages:
                self.open.set()
            await self._stop.wait()
            for page in pages:
                page.cancel()
            await asyncio.gather(*pages, return_exceptions=True)

    def __enter__(self) -> Pages:
        self._thread.start()
        if not self.open.wait(60):
            raise RuntimeError(f"{self.count} pages did not open")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def run(folder: Path, broker: Broker, sim: Simulator, pages: int, requests: int) -> dict[str, Any]:
    port = free_port()
    daemon = Target(
        "daemon", folder, broker, sim, sections={"http": {"enabled": True, "port": port}}
    )
    with driving(daemon, broker) as loadgen:
        loadgen.concurrent(id_topics(500), 50)  # warm-up
        time.sleep(1)
        with Pages(f"http://127.0.0.1:{port}/events", pages) as opened:
            time.sleep(1)
            rss_open = rss_mib(daemon.pid)
            cpu = cpu_s(daemon.pid)
            elapsed = loadgen.concurrent(id_topics(requests), 50) if requests else 0.0
            cpu_ms = (cpu_s(daemon.pid) - cpu) * 1000
            rss_after = rss_mib(daemon.pid)
            received = opened.events
    return {
        "pages": pages,
        "requests": requests,
        "rss_with_pages_mib": rss_open,
        "rss_after_mib": rss_after,
        "cpu_ms_per_request": cpu_ms / requests if requests else 0.0,
        "throughput_rps": requests / elapsed if elapsed else 0.0,
        "chunks_received_by_pages": received,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 requests, 100 idle pages")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args, _ = parser.parse_known_args()
    requests = 1_000 if args.quick else 10_000
    idle_pages = 100 if args.quick else 1_000
    with workspace() as folder:
        broker = Broker(folder)
        sim = Simulator(folder, load_tasks())
        with running(broker, sim):
            results = [
                run(folder, broker, sim, 0, requests),
                run(folder, broker, sim, 100, requests),
                run(folder, broker, sim, idle_pages, 0),
            ]
    for r in results:
        print(json.dumps(r), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "status_page.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "status_page.md").write_text(report(results))
    return 0


def report(results: list[dict[str, Any]]) -> str:
    none, hundred, idle = results
    lines = [
        "# Status page cost",
        "",
        f"{hundred['requests']:,} requests, 50 in flight; pages are open Server-Sent Events"
        " streams, each reading every event.",
        "",
        "| pages open | requests | RSS with the pages open (MiB) | RSS after the requests (MiB)"
        " | CPU per request (ms) | requests/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in (none, hundred, idle):
        lines.append(
            f"| {r['pages']:,} | {r['requests']:,} | {r['rss_with_pages_mib']:.1f}"
            f" | {r['rss_after_mib']:.1f} | {r['cpu_ms_per_request']:.2f}"
            f" | {r['throughput_rps']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
