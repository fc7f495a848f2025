"""One message → accept / refuse / ignore, with the reply topic chosen first."""

from __future__ import annotations

from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtt_starter.core.errors import RequestError
from mqtt_starter.core.model import Request, Selector, SelectorKind
from mqtt_starter.core.routing import Route, TopicFilter, When
from mqtt_starter.core.triggers import Accept, Ignore, Refuse, TriggerRules, interpret

ROUTE = Route(
    TopicFilter.parse("factory/+/ready"),
    (Selector(SelectorKind.TAG, "reload-{1}"),),
    When("status", "complete"),
    debounce_s=5,
)
RULES = TriggerRules(
    base="butler",
    routes=(ROUTE,),
    reply_allow=(TopicFilter.parse("replies/#"), TopicFilter.parse("butler/reply/#")),
    max_payload_bytes=1000,
)


def test_accept_with_response_topic() -> None:
    decision = interpret(
        RULES, "butler/start/tag/a", b'{"requestId": "r"}', response_topic="replies/x"
    )
    assert decision == Accept(
        Request((Selector(SelectorKind.TAG, "a"),), request_id="r"), "replies/x", "tag"
    )


def test_reply_to_is_used_when_there_is_no_response_topic() -> None:
    decision = interpret(RULES, "butler/start/tag/a", b'{"replyTo": "replies/y"}')
    assert isinstance(decision, Accept)
    assert decision.reply_topic == "replies/y"


def test_errors_go_to_the_response_topic_with_the_request_id() -> None:
    decision = interpret(
        RULES, "butler/start", b'{"requestId": "r", "tags": 1}', response_topic="replies/x"
    )
    assert isinstance(decision, Refuse)
    assert (decision.reply_topic, decision.request_id, decision.error.code) == (
        "replies/x",
        "r",
        "bad_payload",
    )


def test_refused_reply_topic_answers_on_the_default_topic() -> None:
    decision = interpret(RULES, "butler/start/tag/a", b'{"replyTo": "elsewhere"}')
    assert isinstance(decision, Refuse)
    assert (decision.reply_topic, decision.error.code) == (
        "butler/reply/start/tag/a",
        "reply_topic_refused",
    )


def test_retained_is_ignored_unless_accepted() -> None:
    assert isinstance(interpret(RULES, "butler/start/tag/a", b"{}", retain=True), Ignore)
    rules = TriggerRules(base="butler", accept_retained=True)
    assert isinstance(interpret(rules, "butler/start/tag/a", b"{}", retain=True), Accept)
    # Clearing a retained message never triggers, accepted or not.
    cleared = interpret(rules, "butler/start/tag/a", b"", retain=True)
    assert cleared == Ignore("an empty retained message (a retained trigger being cleared)", "tag")


def test_routes() -> None:
    accepted = interpret(RULES, "factory/l1/ready", b'{"status": "complete"}')
    assert accepted == Accept(
        Request((Selector(SelectorKind.TAG, "reload-l1"),)),
        "butler/reply/factory/l1/ready",
        "route",
        debounce_key=("factory/+/ready", (Selector(SelectorKind.TAG, "reload-l1"),)),
        debounce_s=5,
    )
    assert isinstance(interpret(RULES, "factory/l1/ready", b'{"status": "busy"}'), Ignore)
    assert isinstance(interpret(RULES, "factory/l1/ready", b"junk"), Ignore)
    too_big = interpret(RULES, "factory/l1/ready", b" " * 2000)
    assert isinstance(too_big, Refuse)
    assert too_big.error.code == "payload_too_large"


def test_unknown_topic_is_ignored() -> None:
    assert isinstance(interpret(RULES, "elsewhere/x", b""), Ignore)


def test_route_so_wide_that_its_reply_would_trigger_it_gets_no_reply() -> None:
    rules = TriggerRules(
        base="butler",
        routes=(Route(TopicFilter.parse("butler/#"), (Selector(SelectorKind.TAG, "x"),)),),
    )
    decision = interpret(rules, "butler/anything", b"")
    assert isinstance(decision, Accept)
    assert decision.reply_topic is None


SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
TOPIC_LEVEL = st.text(
    alphabet=st.characters(blacklist_categories=SURROGATES, blacklist_characters="/+#\x00"),
    max_size=12,
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "requestId",
                    "replyTo",
                    "taskIds",
                    "tags",
                    "names",
                    "customProperties",
                    "name",
                    "value",
                    "wait",
                    "dryRun",
                    "type",
                    "payload",
                    "taskId",
                    "tag",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(
    topic=st.lists(TOPIC_LEVEL, min_size=1, max_size=6)
    .map("/".join)
    .map(lambda t: "butler/start/" + t)
    | st.lists(TOPIC_LEVEL, max_size=4).map(lambda levels: "/".join(["factory", *levels])),
    payload=JSON.map(lambda v: __import__("json").dumps(v).encode()) | st.binary(max_size=64),
    retain=st.booleans(),
    response=st.none() | st.text(max_size=20),
)
def test_interpret_only_ever_answers_with_the_error_tree(
    topic: str, payload: bytes, retain: bool, response: str | None
) -> None:
    decision = interpret(RULES, topic, payload, retain=retain, response_topic=response)
    assert isinstance(decision, Accept | Refuse | Ignore)
    if isinstance(decision, Refuse):
        assert isinstance(decision.error, RequestError)
        assert decision.error.code in (
            "bad_payload",
            "bad_topic",
            "payload_too_large",
            "reply_topic_refused",
        )


BIG = TriggerRules(base="butler", max_payload_bytes=1_000_000)


@pytest.mark.parametrize("depth", [33, 1000, 100_000])
def test_deep_nesting_is_refused_without_recursion(depth: int) -> None:
    # Nested inside a valid request's field, so that only the depth guard can refuse it.
    payload = b'{"requestId": "deep", "tags": ' + b"[" * depth + b"]" * depth + b"}"
    decision = interpret(BIG, "butler/start", payload)
    assert isinstance(decision, Refuse)
    assert str(decision.error) == "JSON is nested deeper than 32 levels"


def test_nesting_up_to_the_limit_reaches_the_schema() -> None:
    payload = b'{"requestId": "deep", "tags": ' + b"[" * 31 + b"]" * 31 + b"}"
    decision = interpret(BIG, "butler/start", payload)
    assert isinstance(decision, Refuse)
    assert str(decision.error) == "tags[0]: expected a string"
