"""The simulated reloads' logs: written when a reload ends (its `log` field is the short
summary since 2026-02; the full log is served on its own), and not there for a number of reads
after the end (CloudVariants.log_ready_after_reads).
"""

from __future__ import annotations

from typing import Any

from mqtt_starter.simulators.cloud.fixtures import App


class ReloadLogs:
    """Logs by reload id, and the reads of logs not there yet."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self._reads: dict[str, int] = {}

    def not_ready(self, reload_id: str, reads_before_ready: int) -> bool:
        """Whether this read of a finished reload's log finds it not there yet (counted)."""
        reads = self._reads.get(reload_id, 0)
        if reads >= reads_before_ready:
            return False
        self._reads[reload_id] = reads + 1
        return True

    def write(self, reload: dict[str, Any], app: App) -> None:
        """The ended reload's log, and its summary in `log`."""
        stamp = reload["creationTime"][:19].replace("T", " ")
        lines = [f"{stamp} Reload started for app {app.name}"]
        lines += [
            f"{stamp} {i:04d} LOAD * FROM [lib://DataFiles/part{i}.qvd] (qvd);"
            for i in range(app.outcome.log_lines)
        ]
        if reload["status"] == "FAILED":
            lines += [f"{stamp} Error: {reload['errorMessage']}", f"{stamp} Execution Failed"]
        elif reload["status"] == "CANCELED":
            lines += [f"{stamp} Reload canceled"]
        lines += [f"{stamp} Execution finished."]
        self.texts[reload["id"]] = "\n".join(lines) + "\n"
        # Since 2026-02 `log` is a short summary; the full log is served on its own.
        reload["log"] = lines[-2] if reload["status"] == "FAILED" else lines[-1]
