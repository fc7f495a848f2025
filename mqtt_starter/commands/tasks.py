"""`mqtt-starter tasks`: resolve selectors exactly as the daemon would, and show the tasks.

Starts nothing. Without selectors it lists every task. The allow-list of the configuration
is applied, so an operator sees which tasks a trigger could start.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mqtt_starter.config import Settings
from mqtt_starter.core.model import Resolution, ResolvedTask, Selector, SelectorKind
from mqtt_starter.service.parts import allow_list, open_backend
from mqtt_starter.sites.base import resolve_selectors

TYPES = {0: "reload", 1: "external", 2: "usersync", 3: "distribute", 4: "preload"}


def parse_selectors(
    ids: Sequence[str],
    tags: Sequence[str],
    cps: Sequence[str],
    names: Sequence[str],
    spaces: Sequence[str] = (),
) -> list[Selector]:
    """Selectors from command-line values; a custom property is NAME=VALUE."""
    selectors = [Selector(SelectorKind.ID, v) for v in ids]
    selectors += [Selector(SelectorKind.TAG, v) for v in tags]
    for text in cps:
        name, sep, value = text.partition("=")
        if not sep or not name:
            raise ValueError(f"--cp {text!r}: expected NAME=VALUE")
        selectors.append(Selector(SelectorKind.CUSTOM_PROPERTY, value, name))
    selectors += [Selector(SelectorKind.NAME, v) for v in names]
    selectors += [Selector(SelectorKind.SPACE, v) for v in spaces]
    return selectors


async def list_tasks(settings: Settings, selectors: Sequence[Selector]) -> Resolution:
    backend = await open_backend(settings)
    try:
        if selectors:
            return await resolve_selectors(backend, selectors)
        return Resolution(tuple(ResolvedTask(t, ()) for t in await backend.all_tasks()))
    finally:
        await backend.close()


def rows(settings: Settings, resolution: Resolution) -> list[dict[str, Any]]:
    allow = allow_list(settings.policy)
    return [
        {
            "taskId": r.task.id,
            "taskName": r.task.name,
            "type": TYPES.get(r.task.task_type, str(r.task.task_type)),
            "enabled": r.task.enabled,
            "tags": list(r.task.tags),
            "customProperties": [
                {"name": cp.name, "value": cp.value} for cp in r.task.custom_properties
            ],
            "space": r.task.space or None,
            "lastState": r.task.last_status.qrs_name,
            "allowed": allow is None or allow.allows(r.task),
            "matchedBy": [s.match_label for s in r.matched_by],
        }
        for r in (*resolution.tasks, *resolution.withheld)
    ]


def render_json(settings: Settings, resolution: Resolution) -> str:
    return json.dumps(
        {
            "tasks": rows(settings, resolution),
            "unmatched": [
                {"selector": u.selector.label, "reason": u.reason.value}
                for u in resolution.unmatched
            ],
        },
        indent=2,
        ensure_ascii=False,
    )


def render_table(settings: Settings, resolution: Resolution) -> str:
    table = [("ID", "NAME", "TYPE", "ENABLED", "TAGS", "LAST STATE", "ALLOWED", "MATCHED BY")]
    for row in rows(settings, resolution):
        table.append(
            (
                row["taskId"],
                row["taskName"],
                row["type"],
                "yes" if row["enabled"] else "no",
                ",".join(row["tags"]),
                row["lastState"],
                "yes" if row["allowed"] else "no",
                ",".join(row["matchedBy"]),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table
    ]
    lines += [f"unmatched: {u.selector.label} ({u.reason.value})" for u in resolution.unmatched]
    lines.append(f"{len(table) - 1} task(s)")
    return "\n".join(lines)
