"""The hot path side by side: the daemon on each event loop against the floor, in one run.

    python -m benchmarks.hotpath [--runs 3] [--requests 20000] [--before COMMIT[:asyncio]]...
                                 [--profile DIR]

For each run and each target (the floor; the daemon on asyncio's loop; the daemon on uvloop;
for each --before, the daemon as it was at COMMIT, from a git worktree, on its own default
loop or, with `:asyncio`, on asyncio's),
with the same broker and simulator at zero service time: p50 and p99 of one request at a time,
throughput at 50 requests in flight, and the target's CPU per request during that run. Prints
medians and ratios to the floor and writes hotpath.json and hotpath.md into --out. With
--profile, each daemon's throughput run is also recorded by py-spy (when installed) as a
flame graph in DIR: where the CPU goes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from .harness import Broker, Simulator, Target, cpu_s, driving, rss_mib, running, workspace
from .run import id_topics, load_tasks, percentiles

TARGETS: dict[str, dict[str, str]] = {
    "floor": {},
    "daemon (asyncio)": {"MQTT_STARTER_LOOP": "asyncio"},
    "daemon (uvloop)": {"MQTT_STARTER_LOOP": "uvloop"},
}


def one(
    name: str,
    folder: Path,
    broker: Broker,
    sim: Simulator,
    requests: int,
    profile: Path | None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    kind = "floor" if name == "floor" else "daemon"
    target = Target(kind, folder, broker, sim, env=TARGETS[name] if env is None else env)
    spy: subprocess.Popen[bytes] | None = None
    with driving(target, broker) as loadgen:
        try:
            loadgen.concurrent(id_topics(500), 50)  # warm-up: connections, caches
            time.sleep(0.5)
            idle = rss_mib(target.pid)
            latencies = loadgen.one_at_a_time(id_topics(1000))
            if profile is not None and kind == "daemon" and shutil.which("py-spy"):
                svg = profile / f"{name.replace(' ', '-').strip('()')}.svg"
                spy = subprocess.Popen(
                    ["py-spy", "record", "-r", "250", "-o", str(svg), "-p", str(target.pid)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                time.sleep(1)
            cpu = cpu_s(target.pid)
            elapsed = loadgen.concurrent(id_topics(requests), 50)
            used = cpu_s(target.pid) - cpu
            return {
                "p50_ms": percentiles(latencies)["p50_ms"],
                "p99_ms": percentiles(latencies)["p99_ms"],
                "throughput_rps": requests / elapsed,
                "cpu_ms_per_request": used * 1000 / requests,
                "rss_idle_mib": idle,
            }
        finally:
            if spy is not None:
                spy.send_signal(2)
                spy.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument(
        "--before",
        action="append",
        default=[],
        metavar="COMMIT[:asyncio]",
        help="also run the daemon as of this commit (repeatable)",
    )
    args = parser.parse_args()
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    targets = dict(TARGETS)
    root = Path(__file__).resolve().parents[1]
    trees: list[Path] = []
    with workspace() as folder:
        for n, before in enumerate(args.before):
            # The daemon as it was: its package first on the path of its process.
            commit, _, loop = before.partition(":")
            tree = folder / f"before-{n}"
            if not tree.exists():
                subprocess.run(
                    ["git", "-C", str(root), "worktree", "add", "--detach", str(tree), commit],
                    check=True,
                    capture_output=True,
                )
                trees.append(tree)
            env = {"PYTHONPATH": str(tree)}
            if loop:
                env["MQTT_STARTER_LOOP"] = loop
            targets[f"{commit[:8]}{' ' + loop if loop else ''}"] = env
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        broker, sim = Broker(folder), Simulator(folder, load_tasks())
        try:
            with running(broker, sim):
                for n in range(args.runs):
                    # Interleaved, so that a slower spell of the machine falls on every target.
                    for name, env in targets.items():
                        result = one(name, folder, broker, sim, args.requests, args.profile, env)
                        runs[name].append(result)
                        print(f"run {n + 1} {name}: {json.dumps(result)}", flush=True)
        finally:
            for tree in trees:
                subprocess.run(
                    ["git", "-C", str(root), "worktree", "remove", "--force", str(tree)],
                    check=False,
                    capture_output=True,
                )
    medians = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in runs.items()
    }
    floor = medians["floor"]
    lines = [
        f"# The hot path ({time.strftime('%Y-%m-%d %H:%M')})",
        "",
        f"Medians of {args.runs} runs; {args.requests} requests at 50 in flight for throughput"
        " and CPU, 1000 one at a time for latency; the simulator at zero service time.",
        "",
        "| figure | " + " | ".join(targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for key in floor:
        cells = []
        for name in targets:
            value = medians[name][key]
            ratio = f" ({value / floor[key]:.2f}x)" if name != "floor" and floor[key] else ""
            cells.append(f"{value:.2f}{ratio}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hotpath.md").write_text(report)
    (args.out / "hotpath.json").write_text(json.dumps({"runs": runs, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
