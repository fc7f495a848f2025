"""The monitor's cost with a slow webhook receiver, side by side with the same load without it.

    python -m benchmarks.webhooks [--quick] [--out DIR]

The site and load of benchmarks.monitor, but every run fired fails: 100 failing runs per
interval, each one alert. Two daemons, one after the other, on the same broker and simulator:
without webhooks, then with one webhook whose receiver takes 2 s to answer each POST. Per
interval: the daemon's CPU time; at the end: its RSS, and what the receiver got. The receiver
answers one POST at a time per connection, as a slow chat tool would, so the webhook's queue
fills to `queue_max` and drops its oldest: memory must stay bounded while CPU stays where it
was. Writes webhooks.json and webhooks.md into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .harness import Broker, Simulator, Target, cpu_s, rss_mib, running, workspace
from .monitor import INTERVAL_S, MONITOR, QUICK_TASKS, TASKS, site, task_ids

RUNS = 100
ANSWER_S = 2.0
QUEUE_MAX = 200


class SlowReceiver:
    """Answers each POST after ANSWER_S seconds; counts them."""

    def __init__(self) -> None:
        self.count = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                time.sleep(ANSWER_S)
                with lock:
                    outer.count += 1
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def failing_ids(count: int) -> list[str]:
    # benchmarks.monitor's site: every tenth task fails.
    return task_ids(count)[9::10]


def measure(
    sim: Simulator, daemon: Target, intervals: int, settle: int, count: int
) -> dict[str, Any]:
    ids = failing_ids(count)
    fired = 0
    cpu_ms: list[float] = []
    for n in range(intervals + settle):
        cpu0 = cpu_s(daemon.pid)
        began = time.monotonic()
        for _ in range(RUNS):
            sim.fire(ids[(fired * 37) % len(ids)])
            fired += 1
        time.sleep(max(0.0, INTERVAL_S - (time.monotonic() - began)))
        if n >= settle:
            cpu_ms.append((cpu_s(daemon.pid) - cpu0) * 1000)
    return {
        "cpu_ms_per_interval": statistics.mean(cpu_ms),
        "cpu_ms_max": max(cpu_ms),
        "rss_mib": rss_mib(daemon.pid),
        "failing_runs": fired,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 intervals a scenario, 1,000 tasks")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args, _ = parser.parse_known_args()
    intervals, settle = (1, 1) if args.quick else (15, 2)
    count = QUICK_TASKS if args.quick else TASKS
    results: dict[str, Any] = {}
    receiver = SlowReceiver()
    hook = {"name": "slow", "url": receiver.url, "timeout_s": 30, "queue_max": QUEUE_MAX,
            "retry": {"attempts": 1}}  # fmt: skip
    try:
        for name, alerts in (("without", {"webhooks": []}), ("with", {"webhooks": [hook]})):
            with workspace() as folder:
                broker = Broker(folder)
                sim = Simulator(folder, site(count))
                sections: dict[str, Any] = {"monitor": MONITOR, "alerts": alerts}
                daemon = Target("daemon", folder, broker, sim, events=True, sections=sections)
                with running(broker, sim, daemon):
                    results[name] = measure(sim, daemon, intervals, settle, count)
            results[name]["received"] = receiver.count if name == "with" else 0
            print(json.dumps({name: results[name]}), flush=True)
    finally:
        receiver.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "webhooks.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "webhooks.md").write_text(report(results, intervals, count))
    return 0


def report(results: dict[str, Any], intervals: int, count: int = TASKS) -> str:
    base = results["without"]["cpu_ms_per_interval"]
    lines = [
        "# The monitor with a slow webhook receiver",
        "",
        f"{count:,} tasks; {RUNS} failing runs per interval of {INTERVAL_S:g} s, over"
        f" {intervals} intervals; the receiver answers after {ANSWER_S:g} s;"
        f" the webhook's queue_max {QUEUE_MAX}. CPU: the mean per interval (kernel ticks).",
        "",
        "| daemon | CPU per interval (ms) | vs without | RSS at the end (MiB) | alerts received |",
        "|---|---|---|---|---|",
    ]
    for name in ("without", "with"):
        r = results[name]
        ratio = r["cpu_ms_per_interval"] / base - 1 if base else 0.0
        lines.append(
            f"| {name} webhooks | {r['cpu_ms_per_interval']:.1f} (max {r['cpu_ms_max']:.1f})"
            f" | {ratio:+.0%} | {r['rss_mib']:.1f} | {r['received']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
