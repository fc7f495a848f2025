"""The benchmark harness still runs end to end (at smoke-test sizes; figures are not judged).

Not part of the default pytest run: the README's test command runs it as a step of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def quick_run(module: str, out: Path) -> None:
    """`python -m <module> --quick --out <out>`, which must succeed."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_benchmarks_quick_run_writes_every_result(tmp_path: Path) -> None:
    quick_run("benchmarks.run", tmp_path)
    report = json.loads((tmp_path / "results.json").read_text())
    assert set(report["summary"]) == {"zero", "slow"}
    fan = report["fan_out_slow"]["daemon"]
    assert {n: fan[n]["qrs_calls"] for n in fan} == {"1": 2, "10": 11, "100": 101}
    assert max(fan[n]["peak_in_flight"] for n in fan) <= 8
    assert len(report["targets"]) == 9
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.md").read_text().startswith("# Benchmark results")


def test_monitor_benchmark_quick_run(tmp_path: Path) -> None:
    quick_run("benchmarks.monitor", tmp_path)
    report = json.loads((tmp_path / "monitor.json").read_text())
    assert [r["runs_per_interval"] for r in report] == [0, 10, 100]
    # A quiet site costs the one query of what changed, and nothing else.
    assert set(report[0]["qrs_calls_by_kind"]) == {"changed since"}
    assert report[0]["published_per_interval"] == 0
    assert report[2]["published_per_interval"] > 100
    assert (tmp_path / "monitor.md").read_text().startswith("# Monitor cost per interval")


def test_status_page_benchmark_quick_run(tmp_path: Path) -> None:
    quick_run("benchmarks.status_page", tmp_path)
    none, hundred, idle = json.loads((tmp_path / "status_page.json").read_text())
    assert (none["pages"], hundred["pages"], idle["pages"]) == (0, 100, 100)
    assert none["chunks_received_by_pages"] == 0
    # Every page got its snapshot, and the changes came in batches, not one write each.
    assert 100 < hundred["chunks_received_by_pages"] < 100 * hundred["requests"]
    assert (tmp_path / "status_page.md").read_text().startswith("# Status page cost")


def test_webhooks_benchmark_quick_run(tmp_path: Path) -> None:
    quick_run("benchmarks.webhooks", tmp_path)
    report = json.loads((tmp_path / "webhooks.json").read_text())
    assert set(report) == {"without", "with"}
    assert report["with"]["failing_runs"] == report["without"]["failing_runs"] == 200
    md = (tmp_path / "webhooks.md").read_text()
    assert md.startswith("# The monitor with a slow webhook receiver")
