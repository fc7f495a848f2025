"""The script logs of the simulated reload attempts (qrs-api.md section 4): written as the
engine writes them when an attempt that started ends, handed out through single-use download
ids, and (Variants.log_ready_after_reads) not there yet for a number of reads.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mqtt_starter.simulators.qrs.fixtures import Variants

if TYPE_CHECKING:
    from mqtt_starter.simulators.qrs.state import SimTask

ABORTED, FINISHED_FAIL = 6, 8


class ScriptLogs:
    """Logs by result id, download ids → result id, and the reads of logs not ready yet."""

    def __init__(self, variants: Callable[[], Variants]) -> None:
        self._variants = variants
        self.texts: dict[str, str] = {}
        self.downloads: dict[str, str] = {}
        # Reads of each result's log while it is not there yet.
        self._reads: dict[str, int] = {}

    def write(self, result: dict[str, Any], status: int) -> None:
        """The attempt's script log, as the engine writes it (external programs have none)."""
        task: SimTask = result["_task"]
        if task.spec.type != "reload":
            return
        spec = task.spec.outcome
        stamp = result["startTime"][:19].replace("T", " ")
        lines = [
            f"{stamp} Execution started.",
            f"{stamp} Qlik Sense Server Version 14.212.3",
            f"{stamp} Reloading app {task.spec.app or task.spec.name}",
        ]
        lines += [
            f"{stamp} {i:04d} LOAD * FROM [lib://Data/part{i}.qvd] (qvd);"
            for i in range(spec.log_lines)
        ]
        if status == FINISHED_FAIL:
            lines += [
                f"{stamp} Error: {spec.message or 'The reload failed'}",
                f"{stamp} Execution Failed",
            ]
        elif status == ABORTED:
            lines += [f"{stamp} Execution aborted by user"]
        lines += [f"{stamp} Execution finished."]
        text = "\r\n".join(lines) + "\r\n"
        file_reference = str(uuid.uuid4())
        self.texts[result["id"]] = text
        result.update(
            scriptLogAvailable=True,
            fileReferenceID=file_reference,
            scriptLogLocation=f"sim-node\\{task.id}.{result['id']}.log",
            scriptLogSize=len(text.encode("utf-8")),
        )

    def not_ready(self, result_id: str) -> bool:
        """Whether this read of the result's log finds it not written yet (and counts it)."""
        reads = self._reads.get(result_id, 0)
        if reads >= self._variants().log_ready_after_reads:
            return False
        self._reads[result_id] = reads + 1
        if len(self._reads) > 10_000:
            del self._reads[next(iter(self._reads))]
        return True

    def download(self, result_id: str) -> str | None:
        """A single-use download id for the result's script log; None when it has none."""
        if result_id not in self.texts:
            return None
        download = str(uuid.uuid4())
        if len(self.downloads) >= 1000:
            del self.downloads[next(iter(self.downloads))]
        self.downloads[download] = result_id
        return download
