"""One received message → what to do with it: accept a request, refuse it, or ignore it.

Pure: the MQTT door (doors/mqtt.py) acts on the result. The reply topic is chosen first
(MQTT 5 Response Topic, else the payload's `replyTo`, else `<base>/reply/...`), so that even a
refusal reaches the requester: `mosquitto_rr` waits on its response topic whatever went wrong.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from mqtt_starter.core.codec import decode_json, parse_request, request_id_of
from mqtt_starter.core.errors import BadPayload, ReplyTopicRefused, RequestError
from mqtt_starter.core.model import Request, Selector
from mqtt_starter.core.routing import (
    Route,
    TopicFilter,
    check_reply_topic,
    default_reply_topic,
    match_route,
    parse_trigger_topic,
    trigger_filters,
)


@dataclass(frozen=True)
class TriggerRules:
    """How the daemon reads a received message: base topic, routes, reply rules."""

    base: str
    routes: tuple[Route, ...] = ()
    reply_allow: tuple[TopicFilter, ...] = (TopicFilter.parse("#"),)
    accept_retained: bool = False
    max_payload_bytes: int = 65536

    @cached_property
    def subscriptions(self) -> tuple[TopicFilter, ...]:
        return (
            *trigger_filters(self.base),
            TopicFilter.parse(self.health_topic),
            *(r.filter for r in self.routes),
        )

    @property
    def health_topic(self) -> str:
        return f"{self.base}/request/health"


@dataclass(frozen=True)
class Ignore:
    """A message that is not a request (retained, a route's condition unmet): logged only."""

    reason: str
    kind: str = "unknown"


@dataclass(frozen=True)
class Refuse:
    """A request refused with an error reply."""

    error: RequestError
    reply_topic: str | None  # None: the default reply topic would itself trigger; no reply
    request_id: str | None = None
    kind: str = "unknown"


@dataclass(frozen=True)
class Accept:
    """A request to serve, with where its reply goes."""

    request: Request
    reply_topic: str | None
    kind: str  # id | tag | cp | name | payload | route
    debounce_key: Hashable | None = None
    debounce_s: float = 0.0


@dataclass(frozen=True)
class Health:
    """A health check, answered like a request."""

    reply_topic: str | None
    request_id: str | None = None
    kind: str = "health"


Decision = Ignore | Refuse | Accept | Health


def topic_kind(rules: TriggerRules, topic: str) -> str:
    """The kind of a trigger topic for metrics and logs, without judging whether it is valid."""
    prefix = f"{rules.base}/start"
    if topic == prefix:
        return "payload"
    if topic == rules.health_topic:
        return "health"
    if topic.startswith(prefix + "/"):
        kind = topic[len(prefix) + 1 :].split("/")[0]
        return kind if kind in ("id", "tag", "cp", "name") else "unknown"
    return "route"


def _reply_to_hint(data: Any) -> str | None:
    value = data.get("replyTo") if isinstance(data, Mapping) else None
    return value if isinstance(value, str) else None


def interpret(
    rules: TriggerRules,
    topic: str,
    payload: bytes,
    *,
    retain: bool = False,
    response_topic: str | None = None,
) -> Decision:
    kind = topic_kind(rules, topic)
    if retain and not payload:
        # The usual way to clear a retained message: never a trigger, whatever the settings.
        return Ignore("an empty retained message (a retained trigger being cleared)", kind)
    if retain and not rules.accept_retained:
        return Ignore("retained message on a trigger topic (mqtt.accept_retained is false)", kind)
    triggers = rules.subscriptions
    default: str | None = default_reply_topic(rules.base, topic)
    if any(f.matches(default or "") for f in triggers):
        default = None  # a route subscribed so widely that its own reply would trigger it
    reply_topic, request_id = default, None

    def choose(candidate: str | None) -> ReplyTopicRefused | None:
        nonlocal reply_topic
        if candidate is None:
            return None
        try:
            check_reply_topic(candidate, rules.reply_allow, triggers)
        except ReplyTopicRefused as refused:
            return refused
        reply_topic = candidate
        return None

    refused = choose(response_topic)
    try:
        if kind == "health":
            data = decode_json(payload, rules.max_payload_bytes)
            request_id = request_id_of(data)
            if refused is None and response_topic is None:
                refused = choose(_reply_to_hint(data))
            if refused is not None:
                raise refused
            return Health(reply_topic, request_id)
        builtin = parse_trigger_topic(rules.base, topic)
        route = None if builtin is not None else match_route(rules.routes, topic)
        if builtin is None and route is None:
            return Ignore("no trigger topic or route matches", kind)
        if route is not None:
            return _route_request(rules, route, payload, reply_topic, refused)
        assert builtin is not None
        kind, selectors = builtin
        data = decode_json(payload, rules.max_payload_bytes)
        request_id = request_id_of(data)
        if refused is None and response_topic is None:
            refused = choose(_reply_to_hint(data))
        if refused is not None:
            raise refused
        request = parse_request(data, selectors, butler_array=kind == "payload")
        if not request.selectors:
            raise BadPayload("no selectors: give taskIds, tags, customProperties or names")
        return Accept(request, reply_topic, kind)
    except RequestError as error:
        return Refuse(error, reply_topic, request_id, kind)


def _route_request(
    rules: TriggerRules,
    found: tuple[Route, Sequence[Any]],
    payload: bytes,
    reply_topic: str | None,
    refused: ReplyTopicRefused | None,
) -> Decision:
    route, selectors = found
    if route.payload_as is not None:
        return _payload_as_request(route, payload, reply_topic, refused)
    data: Any = None
    if route.when is not None or payload.strip():
        try:
            data = decode_json(payload, rules.max_payload_bytes)
        except BadPayload:
            if route.when is not None:
                return Ignore(
                    f"route {route.filter.text}: payload is not JSON, so `when` fails", "route"
                )
    if route.when is not None and not route.when.holds(data):
        return Ignore(
            f"route {route.filter.text}: {route.when.field} does not equal {route.when.equals!r}",
            "route",
        )
    request_id = request_id_of(data)
    if refused is not None:
        return Refuse(refused, reply_topic, request_id, "route")
    request = Request(selectors=tuple(selectors), request_id=request_id)
    return Accept(
        request,
        reply_topic,
        "route",
        debounce_key=(route.filter.text, request.selectors),
        debounce_s=route.debounce_s,
    )


def _payload_as_request(
    route: Route, payload: bytes, reply_topic: str | None, refused: ReplyTopicRefused | None
) -> Decision:
    """A route whose payload is the selector's value (Butler's own MQTT start)."""
    assert route.payload_as is not None
    if refused is not None:
        return Refuse(refused, reply_topic, None, "route")
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = ""
    if not text:
        error = BadPayload(
            f"route {route.filter.text}: the payload is the {route.payload_as.value}: it is"
            " empty or not UTF-8 text"
        )
        return Refuse(error, reply_topic, None, "route")
    selector = Selector(route.payload_as, text)
    return Accept(
        Request(selectors=(selector,)),
        reply_topic,
        "route",
        debounce_key=(route.filter.text, (selector,)),
        debounce_s=route.debounce_s,
    )
