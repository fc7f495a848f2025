"""Where the whole machine's CPU goes in a throughput run: the target, the simulator, the
broker and the load generator, per request, for the floor and the daemon side by side.

    python -m benchmarks.machine [--runs 3] [--requests 10000] [--max-in-flight N]

At 50 requests in flight the machine is saturated, so throughput follows the sum of every
process's CPU per request, not the target's alone. `--max-in-flight` also runs the daemon with
that `mqtt.max_in_flight` (how many triggers it takes from the broker at once). Prints each run
and the medians; nothing is written.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

from .harness import Broker, Simulator, Target, cpu_s, driving, running, workspace
from .run import id_topics, load_tasks


def own_cpu_s() -> float:
    """This process's CPU: the load generator (its paho thread and the publishing one)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one(
    kind: str, max_in_flight: int | None, broker: Broker, sim: Simulator, requests: int
) -> dict[str, float]:
    mqtt = {} if max_in_flight is None else {"max_in_flight": max_in_flight}
    target = Target(kind, broker.folder, broker, sim, mqtt=mqtt)
    with driving(target, broker) as loadgen:
        loadgen.concurrent(id_topics(500), 50)  # warm-up: connections, caches
        time.sleep(0.5)
        assert broker.process is not None and sim.process is not None
        pids = {"target": target.pid, "simulator": sim.process.pid, "broker": broker.process.pid}
        before = {name: cpu_s(pid) for name, pid in pids.items()}
        own = own_cpu_s()
        elapsed = loadgen.concurrent(id_topics(requests), 50)
        row = {name: (cpu_s(pid) - before[name]) * 1000 / requests for name, pid in pids.items()}
        row["loadgen"] = (own_cpu_s() - own) * 1000 / requests
        row["total"] = sum(row.values())
        row["throughput_rps"] = requests / elapsed
        row["cores_busy"] = row["total"] * row["throughput_rps"] / 1000
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--max-in-flight", type=int, default=None)
    args = parser.parse_args()
    targets: list[tuple[str, str, int | None]] = [
        ("floor", "floor", None),
        ("daemon", "daemon", None),
    ]
    if args.max_in_flight is not None:
        targets.append((f"daemon max_in_flight={args.max_in_flight}", "daemon", args.max_in_flight))
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in targets}
    with workspace() as folder:
        broker, sim = Broker(folder), Simulator(folder, load_tasks())
        with running(broker, sim):
            for n in range(args.runs):
                # Interleaved, so that a slower spell of the machine falls on every target.
                for name, kind, max_in_flight in targets:
                    row = one(kind, max_in_flight, broker, sim, args.requests)
                    rows[name].append(row)
                    shown = ", ".join(f"{k} {v:.3f}" for k, v in row.items())
                    print(f"run {n + 1} {name}: {shown}", flush=True)
    print("\nmedians, ms of CPU per request (and throughput, cores busy):")
    for name, results in rows.items():
        medians = {key: statistics.median(r[key] for r in results) for key in results[0]}
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()))


if __name__ == "__main__":
    main()
