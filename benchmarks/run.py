"""Benchmarks: the daemon side by side with the floor, on one broker and one QRS simulator.

    python -m benchmarks.run [--quick] [--runs N] [--out DIR]

Measures latency (one request at a time), throughput (50 in flight), fan-out (one tag that
resolves to 1, 10, 100 and 1,000 tasks; with --quick 1, 10 and 100), memory (RSS idle and
after many requests) and start-up time to READY, with the simulator at zero service time and
at 20 ms per QRS call. Every figure is the median over the runs, with its ratio to the floor.
Writes results.json, results.md and results.png into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from .harness import Broker, Simulator, Target, cpu_s, driving, rss_mib, running, workspace

FAN = (1, 10, 100, 1000)
# The daemon runs with its own defaults (mqtt.max_in_flight 100), while the load keeps 50
# requests in flight and the floor takes them all at once.
DAEMON_MQTT: dict[str, Any] = {}
FULL: dict[str, Any] = {
    "fan": FAN,
    "latency": 2000,
    "throughput": 20000,
    "slow_latency": 300,
    "slow_throughput": 3000,
    "memory": 100_000,
    "fan_reps": 3,
}
QUICK: dict[str, Any] = {
    "fan": FAN[:3],  # the harness end to end; the growth is compared between the last two
    "latency": 100,
    "throughput": 500,
    "slow_latency": 20,
    "slow_throughput": 100,
    "memory": 1000,
    "fan_reps": 1,
}


def load_tasks() -> dict[str, Any]:
    return {
        "max_concurrent": 100_000,
        "tasks": [
            {
                "id": str(uuid.UUID(int=0xBE << 120 | i, version=4)),
                "name": f"Bench {i:02d}",
                "outcome": {"duration_s": 0},
            }
            for i in range(50)
        ],
    }


def fan_tasks(fan: tuple[int, ...] = FAN) -> dict[str, Any]:
    tasks = []
    for n in fan:
        tasks += [
            {
                "id": str(uuid.UUID(int=n << 64 | i, version=4)),
                "name": f"Fan {n}-{i}",
                "tags": [f"fan-{n}"],
                "outcome": {"duration_s": 0},
            }
            for i in range(n)
        ]
    return {"max_concurrent": 100_000, "tasks": tasks}


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "max_ms": ordered[-1] * 1000,
    }


def id_topics(count: int) -> list[str]:
    ids = [t["id"] for t in load_tasks()["tasks"]]
    return [f"butler/start/id/{ids[i % len(ids)]}" for i in range(count)]


def measure(
    kind: str, folder: Path, broker: Broker, sim: Simulator, sizes: dict[str, int], slow: bool
) -> dict[str, Any]:
    target = Target(kind, folder, broker, sim, mqtt=DAEMON_MQTT)
    with driving(target, broker) as loadgen:
        try:
            loadgen.concurrent(id_topics(200), 20)  # warm-up: connections, caches
            n_lat = sizes["slow_latency" if slow else "latency"]
            n_thr = sizes["slow_throughput" if slow else "throughput"]
            latencies = loadgen.one_at_a_time(id_topics(n_lat))
            cpu = cpu_s(target.pid)
            elapsed = loadgen.concurrent(id_topics(n_thr), 50)
            return {
                "startup_s": target.startup_s,
                "latency": percentiles(latencies),
                "latencies": latencies,
                "throughput_rps": n_thr / elapsed,
                "cpu_ms_per_request": (cpu_s(target.pid) - cpu) * 1000 / n_thr,
            }
        except RuntimeError as exc:
            # Unanswered requests: what the daemon (or the floor) said is the first thing to read.
            raise RuntimeError(f"{exc}; the {kind}'s log ends:\n{target.log_tail()}") from exc


def fan_out(
    kind: str, folder: Path, broker: Broker, sim: Simulator, reps: int, fan: tuple[int, ...] = FAN
) -> dict[str, Any]:
    target = Target(kind, folder, broker, sim, mqtt=DAEMON_MQTT)
    results: dict[str, Any] = {}
    with driving(target, broker) as loadgen:
        loadgen.keep_replies = True
        loadgen.one_at_a_time(["butler/start/tag/fan-1"] * 10)  # warm-up: QRS connections
        for n in fan:
            times, calls, peaks = [], [], []
            for _ in range(reps):
                time.sleep(0.3)  # let the previous executions end (zero duration) in the simulator
                sim.clear()
                latency = loadgen.one_at_a_time([f"butler/start/tag/fan-{n}"])[0]
                journal = sim.journal()
                qrs = [e for e in journal["entries"] if e["path"].startswith("/qrs/task")]
                times.append(latency * 1000)
                calls.append(len(qrs))
                peaks.append(journal["peakInFlight"])
            results[str(n)] = {
                "ms": statistics.median(times),
                "qrs_calls": max(calls),
                "peak_in_flight": max(peaks),
            }
    return results


def memory(folder: Path, broker: Broker, sim: Simulator, count: int) -> dict[str, float]:
    target = Target("daemon", folder, broker, sim, mqtt=DAEMON_MQTT)
    with driving(target, broker) as loadgen:
        loadgen.concurrent(id_topics(500), 50)
        time.sleep(1)
        idle = rss_mib(target.pid)
        loadgen.concurrent(id_topics(count), 50)
        time.sleep(1)
        after = rss_mib(target.pid)
    return {"idle_mib": idle, "after_mib": after, "growth_mib": after - idle, "requests": count}


def median_of(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for run in runs:
        node: Any = run
        for key in path:
            node = node[key]
        values.append(float(node))
    return statistics.median(values)


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for variant in ("zero", "slow"):
        runs = raw[variant]
        rows = {}
        for metric, path in (
            ("p50_ms", ("latency", "p50_ms")),
            ("p90_ms", ("latency", "p90_ms")),
            ("p99_ms", ("latency", "p99_ms")),
            ("max_ms", ("latency", "max_ms")),
            ("throughput_rps", ("throughput_rps",)),
            ("cpu_ms_per_request", ("cpu_ms_per_request",)),
            ("startup_s", ("startup_s",)),
        ):
            daemon = median_of([r["daemon"] for r in runs], *path)
            floor = median_of([r["floor"] for r in runs], *path)
            rows[metric] = {
                "daemon": daemon,
                "floor": floor,
                "ratio": daemon / floor if floor else None,
            }
        summary[variant] = rows
    return summary


def targets(summary: dict[str, Any], raw: dict[str, Any]) -> list[tuple[str, str, bool]]:
    zero = summary["zero"]
    # Concurrency and growth show where QRS takes time: the 20 ms variant.
    fan = raw["fan_out_slow"]["daemon"]
    sizes = [int(n) for n in fan]
    larger, smaller = sizes[-1], sizes[-2]
    linear = fan[str(larger)]["ms"] / max(fan[str(smaller)]["ms"], 1e-9)
    return [
        (
            "latency p50 within 1.3x of the floor",
            f"{zero['p50_ms']['ratio']:.2f}x",
            zero["p50_ms"]["ratio"] <= 1.3,
        ),
        (
            "latency p99 within 2x of the floor",
            f"{zero['p99_ms']['ratio']:.2f}x",
            zero["p99_ms"]["ratio"] <= 2.0,
        ),
        (
            "throughput at least 0.9x the floor (mqtt.max_in_flight at its default)",
            f"{zero['throughput_rps']['ratio']:.2f}x",
            zero["throughput_rps"]["ratio"] >= 0.9,
        ),
        (
            "fan-out: one query plus N starts",
            ", ".join(f"N={n}: {fan[str(n)]['qrs_calls']}" for n in sizes),
            all(fan[str(n)]["qrs_calls"] == n + 1 for n in sizes),
        ),
        (
            "fan-out: at most qrs.max_concurrency (8) in flight",
            ", ".join(f"{fan[str(n)]['peak_in_flight']}" for n in sizes),
            all(fan[str(n)]["peak_in_flight"] <= 8 for n in sizes),
        ),
        (
            f"fan-out time grows linearly ({larger} vs {smaller} tasks: ~10x)",
            f"{linear:.1f}x",
            5 <= linear <= 15,
        ),
        (
            "RSS idle under 60 MB",
            f"{raw['memory']['idle_mib']:.1f} MiB",
            raw["memory"]["idle_mib"] * 1.048576 < 60,
        ),
        (
            f"RSS growth after {raw['memory']['requests']} requests under 5 MB",
            f"{raw['memory']['growth_mib']:.1f} MiB",
            raw["memory"]["growth_mib"] * 1.048576 < 5,
        ),
        (
            "start-up to READY under 1 s",
            f"{summary['zero']['startup_s']['daemon']:.2f} s",
            summary["zero"]["startup_s"]["daemon"] < 1.0,
        ),
    ]


def markdown(summary: dict[str, Any], raw: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark results ({raw['meta']['date']})",
        "",
        f"Machine: {raw['meta']['machine']}. Broker: mosquitto, "
        f"set_tcp_nodelay {raw['meta']['broker_nodelay']}. Runs: {raw['meta']['runs']}"
        f" (medians). Sizes: {raw['meta']['sizes']}.",
        "",
        "The daemon runs with its defaults (`mqtt.max_in_flight` 100 while the load keeps 50"
        " requests in flight; the floor has no cap) except `status.publish_task_events: false`"
        " (the floor follows no execution) and a larger `policy.max_tasks_per_request` for the"
        " fan-out. CPU is the process's user and system time during the throughput run.",
        "",
    ]
    for variant, title in (
        ("zero", "QRS simulator at zero service time"),
        ("slow", "QRS simulator at 20 ms per call"),
    ):
        lines += [f"## {title}", "", "| figure | daemon | floor | ratio |", "|---|---|---|---|"]
        for metric, row in summary[variant].items():
            ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "-"
            lines.append(f"| {metric} | {row['daemon']:.2f} | {row['floor']:.2f} | {ratio} |")
        lines.append("")
    for variant, title in (("fan_out", "zero service time"), ("fan_out_slow", "20 ms per call")):
        lines += [
            f"## Fan-out: one tag resolving to N tasks, QRS at {title}",
            "",
            "| N | daemon ms | floor ms | ratio | daemon QRS calls | peak in flight |",
            "|---|---|---|---|---|---|",
        ]
        for n in raw[variant]["daemon"]:
            d, f = raw[variant]["daemon"][n], raw[variant]["floor"][n]
            lines.append(
                f"| {n} | {d['ms']:.1f} | {f['ms']:.1f} | {d['ms'] / f['ms']:.2f}x |"
                f" {d['qrs_calls']} | {d['peak_in_flight']} |"
            )
        lines.append("")
    m = raw["memory"]
    lines += [
        "",
        "## Memory (daemon)",
        "",
        f"RSS idle {m['idle_mib']:.1f} MiB; after {m['requests']} requests"
        f" {m['after_mib']:.1f} MiB (growth {m['growth_mib']:.1f} MiB).",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for name, measured, met in targets(summary, raw):
        lines.append(f"| {name} | {measured} | {'yes' if met else 'NO'} |")
    return "\n".join(lines) + "\n"


def chart(raw: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, colour in (("daemon", "tab:blue"), ("floor", "tab:gray")):
        values = sorted(v * 1000 for v in raw["zero"][0][kind]["latencies"])
        left.plot(values, [i / len(values) for i in range(len(values))], label=kind, color=colour)
        for variant, style, note in (("fan_out", "o-", "0 ms"), ("fan_out_slow", "s--", "20 ms")):
            fan = raw[variant][kind]
            right.plot(
                [int(n) for n in fan],
                [fan[n]["ms"] for n in fan],
                style,
                color=colour,
                label=f"{kind}, QRS {note}/call",
            )
    left.set(
        title="Latency, one request at a time (CDF)",
        xlabel="publish to reply (ms)",
        ylabel="fraction of requests",
        xscale="log",
    )
    right.set(
        title="Fan-out: time to accepted",
        xlabel="tasks behind one tag",
        ylabel="ms",
        xscale="log",
        yscale="log",
    )
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: a smoke test")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--no-nodelay",
        action="store_true",
        help="broker without set_tcp_nodelay (to show Nagle's cost)",
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    runs = 1 if args.quick else args.runs
    raw: dict[str, Any] = {
        "meta": {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "runs": runs,
            "sizes": sizes,
            "machine": f"{platform.machine()}, {subprocess.getoutput('nproc')} cores, Python"
            f" {platform.python_version()}",
            "broker_nodelay": not args.no_nodelay,
        },
        "zero": [],
        "slow": [],
    }
    with workspace() as folder:
        broker = Broker(folder, nodelay=not args.no_nodelay)
        sim = Simulator(folder, load_tasks())
        fan_sim = Simulator(folder, fan_tasks(sizes["fan"]))
        with running(broker, sim, fan_sim):
            for run in range(runs):
                for variant, delay in (("zero", 0.0), ("slow", 0.02)):
                    sim.delay(delay)
                    result = {}
                    for kind in ("floor", "daemon") if run % 2 == 0 else ("daemon", "floor"):
                        result[kind] = measure(kind, folder, broker, sim, sizes, delay > 0)
                        print(
                            f"run {run + 1} {variant} {kind}: {result[kind]['latency']},"
                            f" {result[kind]['throughput_rps']:.0f} req/s",
                            flush=True,
                        )
                    raw[variant].append(result)
            sim.delay(0)
            for variant, delay in (("fan_out", 0.0), ("fan_out_slow", 0.02)):
                fan_sim.delay(delay)
                raw[variant] = {
                    kind: fan_out(kind, folder, broker, fan_sim, sizes["fan_reps"], sizes["fan"])
                    for kind in ("floor", "daemon")
                }
                print(f"{variant}: {raw[variant]}", flush=True)
            raw["memory"] = memory(folder, broker, sim, sizes["memory"])
            print(f"memory: {raw['memory']}", flush=True)
    summary = summarise(raw)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        **raw,
        "summary": summary,
        "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(summary, raw)],
    }
    for variant in ("zero", "slow"):
        for run in report[variant]:
            for kind in run.values():
                kind.pop("latencies", None) if variant == "slow" else None
    (args.out / "results.md").write_text(markdown(summary, raw))
    chart(raw, args.out / "results.png")
    for run in report["zero"]:
        for kind in run.values():
            kind.pop("latencies", None)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
