"""The monitor's cost per interval: QRS calls and daemon CPU with 10,000 tasks on the site.

    python -m benchmarks.monitor [--quick] [--out DIR]

A private mosquitto, the QRS simulator (a process) with 10,000 tasks, and the daemon with the
monitor on. For 0, 10 and 100 runs changing per interval, the load fires that many runs at the
start of each interval as schedules do (no QRS API call; one in ten fails, so its script log is
read), and counts, per interval: the QRS calls the daemon made (by kind), the daemon's CPU time,
and the messages it published. The interval and overlap keep the defaults' proportion (10 s and
10 s) at 2 s and 2 s, so that a run takes minutes, not an hour. Writes monitor.json and
monitor.md into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from .harness import Broker, Simulator, Target, cpu_s, rss_mib, running, workspace

TASKS = 10_000
QUICK_TASKS = 1_000  # --quick: the harness runs end to end, at a tenth of the site
CHANGING = (0, 10, 100)
INTERVAL_S = 2.0
MONITOR = {"enabled": True, "interval_s": INTERVAL_S, "overlap_s": INTERVAL_S, "lookback_s": 0}


def task_ids(count: int) -> list[str]:
    return [str(uuid.UUID(int=0xBE0C << 112 | i)) for i in range(count)]


def site(count: int = TASKS) -> dict[str, Any]:
    """`count` tasks; every tenth fails and writes a 200-line script log."""
    tasks = []
    for i in range(count):
        failing = i % 10 == 9
        tasks.append(
            {
                "id": str(uuid.UUID(int=0xBE0C << 112 | i)),
                "name": f"Reload {i:05d}",
                "tags": [f"group-{i % 100}"],
                "outcome": {
                    "duration_s": 0.2,
                    "result": "fail" if failing else "success",
                    "message": "Field 'Amount' not found" if failing else "",
                    "log_lines": 200,
                },
            }
        )
    return {"max_concurrent": 500, "results_per_task": 2, "tasks": tasks}


class Published:
    """Counts what the daemon publishes under butler/."""

    def __init__(self, broker: Broker) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"count-{uuid.uuid4().hex[:6]}"
        )
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe("butler/#", qos=0)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("counter could not subscribe")

    def _message(self, *_: Any) -> None:
        with self._lock:
            self.count += 1

    def take(self) -> int:
        with self._lock:
            count, self.count = self.count, 0
        return count

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def kind(path: str, query: dict[str, str]) -> str:
    if path == "/qrs/executionresult/full":
        text = query.get("filter", "")
        return "changed since" if text.startswith("modifiedDate") else "execution results"
    if path == "/qrs/task/full":
        return "task read"
    if "/scriptlog" in path:
        return "script log reference"
    if path.startswith("/qrs/download/"):
        return "script log download"
    return path


def scenario(
    sim: Simulator,
    daemon: Target,
    published: Published,
    runs: int,
    intervals: int,
    settle: int = 2,
    count: int = TASKS,
) -> dict[str, Any]:
    ids = task_ids(count)
    fired = 0
    # Intervals to settle, then the measured ones.
    per_interval: list[dict[str, Any]] = []
    for n in range(intervals + settle):
        sim.clear()
        published.take()
        cpu0 = cpu_s(daemon.pid)
        began = time.monotonic()
        for _ in range(runs):
            sim.fire(ids[(fired * 37) % count])  # spread over the site
            fired += 1
        time.sleep(max(0.0, INTERVAL_S - (time.monotonic() - began)))
        calls = Counter(kind(e["path"], e["query"]) for e in sim.journal()["entries"])
        if n >= settle:
            per_interval.append(
                {
                    "cpu_ms": (cpu_s(daemon.pid) - cpu0) * 1000,
                    "calls": dict(calls),
                    "published": published.take(),
                }
            )
    kinds = sorted({k for i in per_interval for k in i["calls"]})
    return {
        "runs_per_interval": runs,
        "intervals": intervals,
        # CPU time comes in clock ticks (10 ms): the mean over the intervals resolves finer.
        "cpu_ms_per_interval": statistics.mean(i["cpu_ms"] for i in per_interval),
        "cpu_ms_max": max(i["cpu_ms"] for i in per_interval),
        "qrs_calls_per_interval": statistics.median(sum(i["calls"].values()) for i in per_interval),
        "qrs_calls_by_kind": {
            k: statistics.mean(i["calls"].get(k, 0) for i in per_interval) for k in kinds
        },
        "published_per_interval": statistics.median(i["published"] for i in per_interval),
        "rss_mib": rss_mib(daemon.pid),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 intervals a scenario, 1,000 tasks")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args, _ = parser.parse_known_args()  # scripts/bench.sh passes run.py's options too
    intervals, settle = (1, 1) if args.quick else (15, 2)
    count = QUICK_TASKS if args.quick else TASKS
    results: list[dict[str, Any]] = []
    with workspace() as folder:
        broker = Broker(folder)
        sim = Simulator(folder, site(count))
        daemon = Target("daemon", folder, broker, sim, events=True, sections={"monitor": MONITOR})
        with running(broker, sim, daemon):
            published = Published(broker)
            try:
                for runs in CHANGING:
                    result = scenario(sim, daemon, published, runs, intervals, settle, count)
                    results.append(result)
                    print(json.dumps(result), flush=True)
            finally:
                published.close()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "monitor.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "monitor.md").write_text(report(results, intervals, count))
    return 0


def report(results: list[dict[str, Any]], intervals: int, count: int = TASKS) -> str:
    lines = [
        "# Monitor cost per interval",
        "",
        f"{count:,} tasks on the site; interval {INTERVAL_S:g} s, overlap {INTERVAL_S:g} s;"
        f" over {intervals} intervals (calls and messages: medians; CPU: the mean, as the kernel"
        " counts it in 10 ms ticks). One run in ten fails (its script log is read).",
        "",
        "| runs changing per interval | QRS calls | of which: changed since / task reads /"
        " script log (reference + download) | daemon CPU (ms) | messages published | RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        by = r["qrs_calls_by_kind"]
        logs = by.get("script log reference", 0) + by.get("script log download", 0)
        lines.append(
            f"| {r['runs_per_interval']} | {r['qrs_calls_per_interval']:g}"
            f" | {by.get('changed since', 0):.1f} / {by.get('task read', 0):.1f} / {logs:.1f}"
            f" | {r['cpu_ms_per_interval']:.1f} (max {r['cpu_ms_max']:.1f})"
            f" | {r['published_per_interval']:g} | {r['rss_mib']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
