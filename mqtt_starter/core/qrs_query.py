"""QRS filters built from selectors, and QRS JSON read into model values.

Pure: no I/O. Rules kept here:
- every string that reaches a filter goes through `quote` (backslashes first, then quotes);
- ids reach a filter only after `normalize_guid` accepted them, so they can stand bare;
- nothing QRS returns is trusted to match: `selector_matches` re-checks each task.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any
from urllib.parse import quote as url_quote

from mqtt_starter.core.model import (
    CustomPropertyValue,
    Detail,
    Execution,
    Selector,
    SelectorKind,
    TaskRef,
    TaskStatus,
)

EMPTY_GUID = "00000000-0000-0000-0000-000000000000"
NEVER = "1753-01-01T00:00:00.000Z"
_ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,7})?Z$")
_GUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
# Keeps each filter well under the URL lengths that proxies in front of QRS accept.
MAX_TERMS_PER_FILTER = 50
# ... and keeps each filter's URL-encoded form within this many bytes: HTTP servers refuse
# request lines over 8 KiB (aiohttp) or less (proxies), whatever the number of terms.
MAX_FILTER_BYTES = 6000
# A tag, name or custom property longer than this is refused: with the worst-case encoding
# (12 bytes for a 4-byte character) one term still fits into MAX_FILTER_BYTES.
MAX_VALUE_LENGTH = 300


# What quote(value, safe="") leaves alone in ASCII text: letters, digits and `_.-~`.
_UNSAFE_ASCII = re.compile(r"[^A-Za-z0-9_.~-]")
_ESCAPED = {chr(c): f"%{c:02X}" for c in range(128)}


def _escape(found: re.Match[str]) -> str:
    return _ESCAPED[found.group()]


def percent_encode(value: str) -> str:
    """`value` percent-encoded for a URL's query, exactly as `quote(value, safe="")`.

    ASCII text (every filter of ids, most tags and names) is scanned in C and only its few
    unsafe characters replaced; quote's own loop calls a function for every character, and
    every QRS call encodes its filter twice (to size the chunks, and in the URL)."""
    return _UNSAFE_ASCII.sub(_escape, value) if value.isascii() else url_quote(value, safe="")


@lru_cache(maxsize=256)
def normalize_guid(text: str) -> str | None:
    """The lower-case GUID, or None when `text` is not one (surrounding white space ignored).

    Remembered for the last 256 texts: a request asks this of the same id about seven times
    (deduplication, the query, matching, the start). Enough for the requests in flight; a
    thousand entries held 0.2 MiB more for little gain."""
    candidate = text.strip()
    return candidate.lower() if _GUID.match(candidate) else None


def quote(value: str) -> str:
    """A QRS filter string literal: backslashes escaped first, then single quotes."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _term(selector: Selector) -> str:
    match selector.kind:
        case SelectorKind.ID:
            guid = normalize_guid(selector.value)
            if guid is None:
                raise ValueError(f"not a GUID: {selector.value!r}")
            return f"id eq {guid}"
        case SelectorKind.TAG:
            return f"tags.name eq {quote(selector.value)}"
        case SelectorKind.NAME:
            return f"name eq {quote(selector.value)}"
        case SelectorKind.CUSTOM_PROPERTY:
            return (
                f"(customProperties.definition.name eq {quote(selector.name)}"
                f" and customProperties.value eq {quote(selector.value)})"
            )
        case SelectorKind.SPACE:
            raise ValueError("QRS has no spaces: the backend reports them unsupported")


def task_filters(selectors: Sequence[Selector]) -> list[str]:
    """Filters for `/qrs/task/full` that together find every task of `selectors`.

    Selectors are joined with `or`, at most MAX_TERMS_PER_FILTER and MAX_FILTER_BYTES (encoded)
    to a filter, so a request costs one query per chunk of selectors rather than one per task.
    """
    return _joined(_term(s) for s in selectors)


def executions_filters(execution_ids: Iterable[str]) -> list[str]:
    """Filters for `/qrs/executionresult/full` that together find every attempt of the given
    executions: one query per chunk, however many runs are followed."""
    return _joined(execution_filter(i) for i in execution_ids)


def changed_filter(since: str) -> str:
    """The execution results QRS modified at or after `since` (ISO 8601, UTC)."""
    if not _ISO_TIME.match(since):
        raise ValueError(f"not an ISO 8601 UTC time: {since!r}")
    return f"modifiedDate ge {quote(since)}"


def _joined(terms: Iterable[str]) -> list[str]:
    filters: list[list[str]] = []
    size = 0
    for term in terms:
        cost = len(percent_encode(term)) + len("%20or%20")
        if (
            not filters
            or len(filters[-1]) >= MAX_TERMS_PER_FILTER
            or size + cost > (MAX_FILTER_BYTES)
        ):
            filters.append([])
            size = 0
        filters[-1].append(term)
        size += cost
    return [" or ".join(chunk) for chunk in filters]


def too_long(selector: Selector) -> bool:
    return max(len(selector.value), len(selector.name)) > MAX_VALUE_LENGTH


def execution_filter(execution_id: str) -> str:
    guid = normalize_guid(execution_id)
    if guid is None:
        raise ValueError(f"not a GUID: {execution_id!r}")
    return f"executionID eq {guid}"


def result_filter(result_id: str) -> str:
    guid = normalize_guid(result_id)
    if guid is None:
        raise ValueError(f"not a GUID: {result_id!r}")
    return f"id eq {guid}"


def selector_matches(selector: Selector, task: TaskRef) -> bool:
    """Whether `task` really matches `selector`, as QRS compares strings (case-insensitively)."""
    match selector.kind:
        case SelectorKind.ID:
            return normalize_guid(selector.value) == task.id.lower()
        case SelectorKind.TAG:
            wanted = selector.value.casefold()
            return any(tag.casefold() == wanted for tag in task.tags)
        case SelectorKind.NAME:
            return task.name.casefold() == selector.value.casefold()
        case SelectorKind.SPACE:
            return task.space.casefold() == selector.value.casefold()
        case SelectorKind.CUSTOM_PROPERTY:
            name, value = selector.name.casefold(), selector.value.casefold()
            return any(
                cp.name.casefold() == name and cp.value.casefold() == value
                for cp in task.custom_properties
            )


def _status(value: Any) -> TaskStatus:
    try:
        return TaskStatus(int(value))
    except (TypeError, ValueError):
        return TaskStatus.NEVER_STARTED


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _named(items: Any) -> Iterable[Mapping[str, Any]]:
    return [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def parse_task(data: Mapping[str, Any]) -> TaskRef | None:
    """A TaskRef from a (full or condensed) QRS task object; missing parts become defaults.

    None for an object without a GUID id: nothing could be started from it.
    """
    task_id = normalize_guid(_str(data.get("id")))
    if task_id is None:
        return None
    operational = data.get("operational")
    last = operational.get("lastExecutionResult") if isinstance(operational, Mapping) else None
    if not isinstance(last, Mapping):
        last = {}
    app = data.get("app")
    return TaskRef(
        id=task_id,
        name=_str(data.get("name")),
        task_type=_int(data.get("taskType")),
        enabled=bool(data.get("enabled", True)),
        tags=tuple(_str(t.get("name")) for t in _named(data.get("tags"))),
        custom_properties=tuple(
            CustomPropertyValue(
                name=_str(cp["definition"].get("name"))
                if isinstance(cp.get("definition"), Mapping)
                else "",
                value=_str(cp.get("value")),
            )
            for cp in _named(data.get("customProperties"))
        ),
        last_status=_status(last.get("status")),
        app_name=_str(app.get("name")) if isinstance(app, Mapping) else "",
        app_id=(normalize_guid(_str(app.get("id"))) or "") if isinstance(app, Mapping) else "",
        last_result_id=(normalize_guid(_str(last.get("id"))) or ""),
    )


def _date(value: Any) -> str | None:
    return value if isinstance(value, str) and value and value != NEVER else None


def parse_execution(data: Mapping[str, Any]) -> Execution:
    """An Execution from a `/qrs/executionresult/full` object.

    QRS does not guarantee the order of `details`: they are sorted by `detailCreatedDate`
    (ISO 8601 strings sort by time), so "the newest message" is the newest.
    """
    details = sorted(_named(data.get("details")), key=lambda d: _str(d.get("detailCreatedDate")))
    errors = [_str(d.get("message")) for d in details if d.get("detailsType") == 0]
    messages = errors or [_str(d.get("message")) for d in details]
    duration = data.get("duration")
    file_reference = normalize_guid(_str(data.get("fileReferenceID"))) or ""
    app_id = normalize_guid(_str(data.get("appID"))) or ""
    return Execution(
        execution_id=_str(data.get("executionID")).lower(),
        task_id=_str(data.get("taskID")).lower(),
        status=_status(data.get("status")),
        start_time=_date(data.get("startTime")),
        stop_time=_date(data.get("stopTime")),
        duration_ms=int(duration) if isinstance(duration, int | float) else 0,
        message=messages[-1] if messages else "",
        reason="\n".join(errors),
        result_id=_str(data.get("id")).lower(),
        modified=_str(data.get("modifiedDate")),
        app_id="" if app_id == EMPTY_GUID else app_id,
        file_reference_id="" if file_reference == EMPTY_GUID else file_reference,
        script_log=data.get("scriptLogAvailable") is True,
        details=tuple(
            Detail(
                _int(d.get("detailsType")), _str(d.get("message")), _str(d.get("detailCreatedDate"))
            )
            for d in details
        ),
    )


def latest_execution(results: Sequence[Execution]) -> Execution | None:
    """The attempt that tells a session's state. Retries add results under one session; while
    one of them is live it is the state, otherwise the one that started last."""
    if not results:
        return None
    return max(
        enumerate(results),
        key=lambda ir: (not ir[1].status.terminal, ir[1].start_time or "", ir[0]),
    )[1]
