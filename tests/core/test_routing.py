"""Topic filters, percent-decoding, built-in trigger topics, routes, reply-topic rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mqtt_starter.core.errors import BadTopic, ReplyTopicRefused
from mqtt_starter.core.model import Selector, SelectorKind
from mqtt_starter.core.routing import (
    Route,
    TopicFilter,
    When,
    check_reply_topic,
    default_reply_topic,
    parse_trigger_topic,
    percent_decode,
)


@pytest.mark.parametrize(
    ("level", "decoded"),
    [
        ("plain", "plain"),
        ("a%2Fb", "a/b"),
        ("a%2bb", "a+b"),
        ("a+b", "a+b"),
        ("%23", "#"),
        ("%25", "%"),
        ("%C3%9C", "Ü"),
        ("Ü", "Ü"),
        ("100%25%20sure", "100% sure"),
    ],
)
def test_percent_decode(level: str, decoded: str) -> None:
    assert percent_decode(level) == decoded


@pytest.mark.parametrize("level", ["%", "%2", "%zz", "a%g1", "%C3"])
def test_percent_decode_refuses_malformed(level: str) -> None:
    with pytest.raises(BadTopic):
        percent_decode(level)


@pytest.mark.parametrize(
    ("filter_text", "topic", "found"),
    [
        ("a/+/c", "a/b/c", ("b",)),
        ("a/+/c", "a/b/d", None),
        ("a/#", "a", ("",)),
        ("a/#", "a/b/c", ("b/c",)),
        ("+/+", "a/b", ("a", "b")),
        ("+/b", "$SYS/b", None),
        ("#", "$SYS/x", None),
        ("a/b", "a/b/c", None),
        ("a/+", "a//", None),
        ("a/+", "a/", ("",)),
    ],
)
def test_topic_filter_match(filter_text: str, topic: str, found: tuple[str, ...] | None) -> None:
    assert TopicFilter.parse(filter_text).match(topic) == found


def walk_levels(filter_text: str, topic: str) -> tuple[str, ...] | None:
    """MQTT's matching rules read level by level: what a compiled filter must agree with."""
    levels, parts = filter_text.split("/"), topic.split("/")
    if topic.startswith("$") and levels[0] in ("+", "#"):
        return None
    found: list[str] = []
    for i, level in enumerate(levels):
        if level == "#":
            return (*found, "/".join(parts[i:]))
        if i >= len(parts) or (level != "+" and level != parts[i]):
            return None
        if level == "+":
            found.append(parts[i])
    return tuple(found) if len(parts) == len(levels) else None


LEVEL = st.sampled_from(["a", "b", "", "$x", ".*", "a\nb", "x\n"])


@given(
    st.lists(st.sampled_from(["a", "b", "+", ".*", "$x"]), min_size=1, max_size=4),
    st.booleans(),
    st.lists(LEVEL, min_size=1, max_size=5),
)
def test_a_compiled_filter_matches_as_mqtt_reads_the_levels(
    levels: list[str], hash_last: bool, topic_levels: list[str]
) -> None:
    filter_text = "/".join([*levels, "#"] if hash_last else levels)
    topic = "/".join(topic_levels)
    compiled = TopicFilter.parse(filter_text)
    assert compiled.match(topic) == walk_levels(filter_text, topic)
    assert compiled.matches(topic) == (walk_levels(filter_text, topic) is not None)
    assert TopicFilter.parse("#").match(topic) == walk_levels("#", topic)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("", "must not be empty"),
        ("a/#/b", "# must be the last level"),
        ("a+/b", "a wildcard must fill a whole level"),
        ("a/b#", "a wildcard must fill"),
    ],
)
def test_topic_filter_parse_refuses(bad: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TopicFilter.parse(bad)


@pytest.mark.parametrize(
    ("topic", "parsed"),
    [
        ("b/start", ("payload", ())),
        ("b/start/id/X", ("id", (Selector(SelectorKind.ID, "X"),))),
        ("b/start/tag/a%2Fb", ("tag", (Selector(SelectorKind.TAG, "a/b"),))),
        (
            "b/start/cp/group/v%20w",
            ("cp", (Selector(SelectorKind.CUSTOM_PROPERTY, "v w", "group"),)),
        ),
        ("b/start/name/Reload Sales", ("name", (Selector(SelectorKind.NAME, "Reload Sales"),))),
        ("b/other/x", None),
        ("b/startx", None),
    ],
)
def test_trigger_topics(topic: str, parsed: object) -> None:
    assert parse_trigger_topic("b", topic) == parsed


@pytest.mark.parametrize(
    "topic",
    ["b/start/id", "b/start/id/", "b/start/tag/a/b", "b/start/cp/x", "b/start/nope/x", "b/start/"],
)
def test_bad_trigger_topics(topic: str) -> None:
    with pytest.raises(BadTopic):
        parse_trigger_topic("b", topic)


def test_route_fills_templates_from_wildcards() -> None:
    route = Route(
        TopicFilter.parse("factory/+/line/#"),
        (
            Selector(SelectorKind.TAG, "reload-{1}-{2}"),
            Selector(SelectorKind.CUSTOM_PROPERTY, "{1}", "site"),
        ),
    )
    assert route.selectors_for("factory/Plant%20A/line/4/x") == (
        Selector(SelectorKind.TAG, "reload-Plant A-4/x"),
        Selector(SelectorKind.CUSTOM_PROPERTY, "Plant A", "site"),
    )
    assert route.selectors_for("factory/a/belt/4") is None


@pytest.mark.parametrize(
    ("payload", "holds"),
    [
        ({"status": "complete"}, True),
        ({"status": "done"}, False),
        ({}, False),
        (None, False),
        ({"status": {"x": 1}}, False),
        ([1], False),
    ],
)
def test_when(payload: object, holds: bool) -> None:
    assert When("status", "complete").holds(payload) is holds


def test_when_nested_and_numbers() -> None:
    assert When("a.b", 1).holds({"a": {"b": 1.0}})
    assert not When("a.b", 1).holds({"a": {"b": True}})
    assert not When("a.b", True).holds({"a": {"b": 1}})


def test_default_reply_topic() -> None:
    assert default_reply_topic("butler", "butler/start/tag/x") == "butler/reply/start/tag/x"
    assert default_reply_topic("butler", "factory/a/ready") == "butler/reply/factory/a/ready"


ALLOW = [TopicFilter.parse("replies/#")]
TRIGGERS = [TopicFilter.parse("butler/start/#"), TopicFilter.parse("factory/+/ready")]


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("", "empty"),
        ("replies/+", "wildcard"),
        ("replies/#", "wildcard"),
        ("$SYS/x", r"starts with \$"),
        ("butler/start/tag/x", "trigger topic"),
        ("butler/start", "trigger topic"),
        ("factory/a/ready", "trigger topic"),
        ("other/x", "outside mqtt.reply_topic_allow"),
    ],
)
def test_reply_topic_refusals(topic: str, reason: str) -> None:
    with pytest.raises(ReplyTopicRefused, match=reason):
        check_reply_topic(topic, ALLOW, TRIGGERS)


def test_reply_topic_accepted() -> None:
    check_reply_topic("replies/erp/1", ALLOW, TRIGGERS)
