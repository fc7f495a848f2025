"""Butler's REST start endpoint, a door of the request service like MQTT:
`PUT|POST /v4/reloadtask/{taskId}/start` with Butler's optional body of `{type, payload}` items
becomes a Request, and the Reply becomes Butler's answer. The log line, metrics, status events
and limits (`policy.max_payload_bytes`) are the service's. Unlike Butler, each start is awaited,
and a task matched by several selectors is started once (and listed under each that matched).

It is the route a page on another site could abuse (a form post or a `no-cors` fetch carry
cookies but no custom header): a form or text body and a foreign `Origin` are refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from mqtt_starter.core.codec import decode_json, parse_butler_items
from mqtt_starter.core.errors import BadPayload, PayloadTooLarge, RequestError
from mqtt_starter.core.model import Reply, Request, Selector, SelectorKind, TaskResult
from mqtt_starter.service.parts import Parts
from mqtt_starter.service.requests import Inbound, Starter, error_reply


def butler_answer(reply: Reply) -> dict[str, Any]:
    """Butler's response body for a reply of the Starter."""
    started_by_id: list[dict[str, str]] = []
    denied_ids: list[dict[str, str]] = []
    tags: list[dict[str, str]] = []
    cps: list[dict[str, str]] = []
    denied_tags: list[dict[str, str]] = []
    denied_cps: list[dict[str, str]] = []
    for outcome in reply.outcomes:
        named = {"taskId": outcome.task.id, "taskName": outcome.task.name}
        for selector in outcome.matched_by:
            started = outcome.result is TaskResult.STARTED
            if selector.kind is SelectorKind.ID:
                # Butler's shape has no place for "running" or "disabled": not started is denied.
                (started_by_id if started else denied_ids).append(
                    named if started else {"taskId": outcome.task.id}
                )
            elif selector.kind is SelectorKind.TAG:
                if started:
                    tags.append(named)
                elif (
                    outcome.result is TaskResult.DENIED
                    and {"tag": selector.value} not in denied_tags
                ):
                    denied_tags.append({"tag": selector.value})
            elif selector.kind is SelectorKind.CUSTOM_PROPERTY:
                entry = {"name": selector.name, "value": selector.value}
                if started:
                    cps.append(named)
                elif outcome.result is TaskResult.DENIED and entry not in denied_cps:
                    denied_cps.append(entry)
    invalid = [
        {"taskId": u.selector.value} for u in reply.unmatched if u.selector.kind is SelectorKind.ID
    ]
    answer: dict[str, Any] = {
        "tasksId": {"started": started_by_id, "invalid": invalid, "denied": denied_ids},
        "tasksTag": tags,
        "tasksTagDenied": denied_tags,
        "tasksCP": cps,
        "tasksCPDenied": denied_cps,
    }
    if reply.ignored:
        answer["ignored"] = list(reply.ignored)  # not in Butler's shape: never silently
    return answer


BROWSER_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


def _refuse_cross_site(request: web.Request) -> None:
    """What a page on another site can send without a CORS preflight (a form, text, a foreign
    Origin) never starts a task; a script with the header token and JSON can."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise CrossSite(f"a start from another origin ({origin[:100]}) is refused")
    # The media types a page may send anywhere without asking first (CORS-safelisted).
    if request.content_type in BROWSER_TYPES or request.content_type.startswith("text/"):
        raise CrossSite(
            f"a {request.content_type} body is refused: send JSON"
            " (Content-Type: application/json), or no body"
        )


class CrossSite(RequestError):
    """A start that a page of another site could have sent: refused (403)."""

    code = "forbidden"


def json_error(status: int, code: str, message: str) -> web.Response:
    """An error answer: `{"code", "message"}` with its HTTP status."""
    return web.json_response({"code": code, "message": message}, status=status)


# HTTP status of each refusal code; any other is 400.
_STATUS = {"payload_too_large": 413, "qrs_unavailable": 503, "internal": 500, "forbidden": 403}


async def _read_at_most(request: web.Request, limit: int) -> bytes:
    """The body, or its first `limit + 1` bytes: enough to tell that it is too large."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class ButlerStart:
    """The start route."""

    def __init__(self, starter: Starter, parts: Callable[[], Parts]) -> None:
        self._starter = starter
        self._parts = parts

    def routes(self) -> list[web.RouteDef]:
        return [
            web.put("/v4/reloadtask/{taskId}/start", self.start),
            web.post("/v4/reloadtask/{taskId}/start", self.start),
        ]

    async def start(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        where = f"{request.method} {request.path}"
        limit = self._parts().settings.policy.max_payload_bytes
        try:
            _refuse_cross_site(request)
            body = await _read_at_most(request, limit)
            asked = self._request(request, body, limit)
        except RequestError as exc:
            refusal = error_reply(None, exc.code, str(exc))
            self._starter.account("http", where, "http", refusal, started)
            return json_error(_STATUS.get(exc.code, 400), exc.code, str(exc))
        reply = await self._starter.handle(Inbound(asked, door="http", topic=where, kind="http"))
        if reply.error is not None:
            code = reply.error.code
            return json_error(_STATUS.get(code, 400), code, reply.error.message)
        return web.json_response(butler_answer(reply))

    @staticmethod
    def _request(request: web.Request, body: bytes, limit: int) -> Request:
        """The request the path, the query and Butler's body make."""
        flag = request.query.get("allTaskIdsMustExist", "false").lower()
        if flag not in ("true", "false"):
            raise BadPayload("allTaskIdsMustExist: expected true or false")
        if len(body) > limit:  # only limit + 1 bytes were read: the size itself is unknown
            raise PayloadTooLarge(f"payload is larger than {limit} bytes (the limit)")
        items: Any = decode_json(body, limit)
        if items is None:
            items = []
        if not isinstance(items, list):
            raise BadPayload("body must be a JSON array of {type, payload} items")
        selectors, ignored = parse_butler_items(items)
        task_id = request.match_info["taskId"]
        if task_id != "-":
            selectors.insert(0, Selector(SelectorKind.ID, task_id))
        if not selectors:
            raise BadPayload("no task id in the path and no items in the body")
        return Request(tuple(selectors), all_task_ids_must_exist=flag == "true", ignored=ignored)
