"""The Node-RED example flow imports as is and talks to the daemon's topics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mqtt_starter.core.routing import TopicFilter, parse_trigger_topic

EXAMPLES = Path(__file__).parents[2] / "examples"


def flow() -> list[dict[str, Any]]:
    nodes = json.loads((EXAMPLES / "node-red-flow.json").read_text())
    assert isinstance(nodes, list)
    return nodes


def test_node_ids_are_unique_and_every_reference_resolves() -> None:
    nodes = flow()
    ids = [n["id"] for n in nodes]
    assert len(ids) == len(set(ids))
    for node in nodes:
        for output in node.get("wires", []):
            assert set(output) <= set(ids), node["id"]
        if node["type"] in ("mqtt in", "mqtt out"):
            assert node["broker"] in ids
        if "z" in node:
            assert node["z"] in ids


def test_requests_go_to_trigger_topics_and_replies_come_back() -> None:
    nodes = {n["id"]: n for n in flow()}
    brokers = {n["id"]: n["protocolVersion"] for n in nodes.values() if n["type"] == "mqtt-broker"}
    assert sorted(brokers.values()) == ["4", "5"]
    outs = [n for n in nodes.values() if n["type"] == "mqtt out"]
    assert all(parse_trigger_topic("butler", n["topic"]) is not None for n in outs)
    reply_topics = set()
    for node in nodes.values():
        if node["type"] == "change":
            reply_topics |= {r["to"] for r in node["rules"] if r["p"] == "responseTopic"}
        if node["type"] == "inject":
            payload = json.loads(node["payload"])
            if "replyTo" in payload:
                reply_topics.add(payload["replyTo"])
    subscribed = {n["topic"] for n in nodes.values() if n["type"] == "mqtt in"}
    assert reply_topics == {"nodered/replies/v5", "nodered/replies/v311"}
    assert reply_topics <= subscribed
    assert any(TopicFilter.parse(t).matches("butler/status/task/x") for t in subscribed)


def test_every_click_sends_a_fresh_request_id() -> None:
    # A fixed requestId would be answered from memory (replayed) within the dedupe window.
    nodes = {n["id"]: n for n in flow()}
    for inject in (n for n in nodes.values() if n["type"] == "inject"):
        assert "requestId" not in json.loads(inject["payload"]), inject["name"]
        node = inject
        rules: list[dict[str, Any]] = []
        while node["type"] != "mqtt out":
            [[next_id]] = node["wires"]
            node = nodes[next_id]
            rules += node.get("rules", [])
        assert {
            "t": "set",
            "p": "payload.requestId",
            "pt": "msg",
            "to": '"node-red-" & $string($millis())',
            "tot": "jsonata",
        } in rules, inject["name"]


def test_a_tab_shows_task_states_and_alerts_on_failures() -> None:
    nodes = {n["id"]: n for n in flow()}
    inputs = {n["topic"]: n for n in nodes.values() if n["type"] == "mqtt in"}
    states, events = inputs["butler/state/task/+"], inputs["butler/event/task/+"]
    # A cleared state is an empty payload: it must not be parsed as JSON.
    assert (states["datatype"], events["datatype"]) == ("auto-detect", "json")
    [[keeper]] = states["wires"]
    assert "delete tasks[id]" in nodes[keeper]["func"]
    [[alert]] = events["wires"]
    assert "e.reason" in nodes[alert]["func"]
    assert {nodes[keeper]["z"], nodes[alert]["z"]} == {states["z"]}
    assert TopicFilter.parse(events["topic"]).matches("butler/event/task/failed")
    assert TopicFilter.parse(events["topic"]).matches("butler/event/task/aborted")
