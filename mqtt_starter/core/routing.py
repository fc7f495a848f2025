"""Topics: MQTT filters, the built-in trigger topics, configured routes and reply-topic rules.

Pure. Topic levels that carry values are percent-decoded (`%2F` → `/`, a bare `+` stays `+`);
a malformed escape or bytes that are not UTF-8 make the topic a `BadTopic`.
A reply topic is refused when it is empty, has wildcards, starts with `$`, matches no allowed
filter, or matches one of the daemon's own trigger subscriptions (a reply must never trigger).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from mqtt_starter.core.errors import BadTopic, ReplyTopicRefused
from mqtt_starter.core.model import Selector, SelectorKind

_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def percent_decode(level: str) -> str:
    """A topic level decoded as in URLs; BadTopic on a malformed escape or non-UTF-8 bytes."""
    if "%" not in level:
        return level
    if _ESCAPE.search(level):
        raise BadTopic(f"malformed percent-encoding in topic level {level!r}")
    raw = bytearray()
    i = 0
    while i < len(level):
        if level[i] == "%":
            raw.append(int(level[i + 1 : i + 3], 16))
            i += 3
        else:
            raw += level[i].encode("utf-8")
            i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadTopic(f"topic level {level!r} does not decode to UTF-8") from None


@dataclass(frozen=True)
class TopicFilter:
    """An MQTT subscription filter, split into levels."""

    text: str
    levels: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> TopicFilter:
        if not text:
            raise ValueError("a topic filter must not be empty")
        levels = tuple(text.split("/"))
        for i, level in enumerate(levels):
            if level not in ("+", "#") and any(c in level for c in "+#"):
                raise ValueError(f"{text!r}: a wildcard must fill a whole level")
            if level == "#" and i != len(levels) - 1:
                raise ValueError(f"{text!r}: # must be the last level")
        return cls(text, levels)

    @property
    def wildcards(self) -> int:
        return sum(level in ("+", "#") for level in self.levels)

    @cached_property
    def _pattern(self) -> re.Pattern[str]:
        """The filter as one expression, compiled once: every message is matched against
        several filters, and walking their levels in Python cost more than the rest of reading
        the topic. `+` is one level (possibly empty); a final `#` is the rest, or nothing when
        the topic is the parent level itself."""
        last = self.levels[-1] == "#"
        body = "/".join(
            "([^/]*)" if level == "+" else re.escape(level)
            for level in (self.levels[:-1] if last else self.levels)
        )
        if last:
            body = f"{body}(?:/(.*))?" if body else "(.*)"
        return re.compile(body, re.DOTALL)

    def match(self, topic: str) -> tuple[str, ...] | None:
        """The levels the wildcards stand for (a `#` gives the rest joined by `/`), or None."""
        # MQTT: a filter starting with a wildcard does not match a topic starting with `$`.
        if topic.startswith("$") and self.levels[0] in ("+", "#"):
            return None
        found = self._pattern.fullmatch(topic)
        if found is None:
            return None
        return tuple(value or "" for value in found.groups())

    def matches(self, topic: str) -> bool:
        if topic.startswith("$") and self.levels[0] in ("+", "#"):
            return False
        return self._pattern.fullmatch(topic) is not None


# -- built-in trigger topics -----------------------------------------------------------------

_TOPIC_KINDS: dict[str, tuple[int, Callable[[list[str]], Selector]]] = {
    "id": (1, lambda v: Selector(SelectorKind.ID, v[0])),
    "tag": (1, lambda v: Selector(SelectorKind.TAG, v[0])),
    "name": (1, lambda v: Selector(SelectorKind.NAME, v[0])),
    "cp": (2, lambda v: Selector(SelectorKind.CUSTOM_PROPERTY, v[1], name=v[0])),
    "space": (1, lambda v: Selector(SelectorKind.SPACE, v[0])),
}


def trigger_filters(base: str) -> tuple[TopicFilter, ...]:
    """What the daemon subscribes to for its built-in topics.

    One filter: `#` also matches its parent level, so `<base>/start/#` covers `<base>/start`,
    and a second, overlapping subscription would make the broker deliver each trigger twice.
    """
    return (TopicFilter.parse(f"{base}/start/#"),)


def parse_trigger_topic(base: str, topic: str) -> tuple[str, tuple[Selector, ...]] | None:
    """(topic kind, selectors) for a built-in trigger topic, None for a topic outside them.

    The kind is `payload` for `<base>/start`, else `id`, `tag`, `cp` or `name`.
    """
    prefix = f"{base}/start"
    if topic == prefix:
        return "payload", ()
    if not topic.startswith(prefix + "/"):
        return None
    levels = topic[len(prefix) + 1 :].split("/")
    kind, values = levels[0], levels[1:]
    spec = _TOPIC_KINDS.get(kind)
    if spec is None:
        raise BadTopic(f"unknown trigger kind {kind!r}: use {base}/start/<id|tag|cp|name>/...")
    count, build = spec
    if len(values) != count or not all(values):
        shape = "<name>/<value>" if kind == "cp" else "<value>"
        raise BadTopic(f"{prefix}/{kind} takes {shape}: percent-encode a / inside a value as %2F")
    return kind, (build([percent_decode(v) for v in values]),)


# -- configured routes -------------------------------------------------------------------------


@dataclass(frozen=True)
class When:
    """A route's condition on the JSON payload."""

    field: str
    equals: Any

    def holds(self, payload: Any) -> bool:
        node = payload
        for key in self.field.split("."):
            if not isinstance(node, Mapping) or key not in node:
                return False
            node = node[key]
        return bool(node == self.equals and type(node) is type(self.equals)) or (
            isinstance(node, int | float)
            and isinstance(self.equals, int | float)
            and not isinstance(node, bool)
            and not isinstance(self.equals, bool)
            and node == self.equals
        )


@dataclass(frozen=True)
class Route:
    """A configured topic filter and the selectors it stands for, with `{n}` templates."""

    filter: TopicFilter
    selectors: tuple[Selector, ...]
    when: When | None = None
    debounce_s: float = 0.0
    payload_as: SelectorKind | None = None  # the payload's text is the one selector

    def selectors_for(self, topic: str) -> tuple[Selector, ...] | None:
        """The route's selectors with `{n}` filled from `topic`, or None when it does not match."""
        found = self.filter.match(topic)
        if found is None:
            return None
        values = [percent_decode(v) for v in found]

        def fill(template: str) -> str:
            return re.sub(r"\{(\d+)\}", lambda m: values[int(m.group(1)) - 1], template)

        return tuple(Selector(s.kind, fill(s.value), fill(s.name)) for s in self.selectors)


def match_route(routes: Sequence[Route], topic: str) -> tuple[Route, tuple[Selector, ...]] | None:
    """The first route whose filter matches `topic`, with its filled-in selectors."""
    for route in routes:
        selectors = route.selectors_for(topic)
        if selectors is not None:
            return route, selectors
    return None


# -- reply topics ------------------------------------------------------------------------------


def default_reply_topic(base: str, request_topic: str) -> str:
    """`<base>/reply/<request topic after <base>/>`; a route topic outside <base> stays whole."""
    rest = request_topic[len(base) + 1 :] if request_topic.startswith(base + "/") else request_topic
    return f"{base}/reply/{rest}"


def check_reply_topic(
    topic: str, allow: Sequence[TopicFilter], triggers: Sequence[TopicFilter]
) -> None:
    """ReplyTopicRefused with the reason, when a client-chosen reply topic breaks the rules."""
    if not topic:
        raise ReplyTopicRefused("reply topic is empty")
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise ReplyTopicRefused(f"reply topic {topic!r} contains a wildcard or NUL")
    if topic.startswith("$"):
        raise ReplyTopicRefused(f"reply topic {topic!r} starts with $")
    # A character is at most 4 bytes in UTF-8: only a long topic can be too long.
    if len(topic) > 65535 // 4 and len(topic.encode("utf-8")) > 65535:
        raise ReplyTopicRefused("reply topic is longer than MQTT allows")
    if any(f.matches(topic) for f in triggers):
        raise ReplyTopicRefused(f"reply topic {topic!r} is a trigger topic of this daemon")
    if not any(f.matches(topic) for f in allow):
        raise ReplyTopicRefused(f"reply topic {topic!r} is outside mqtt.reply_topic_allow")
