"""Which of several monitor-enabled instances monitors (DESIGN.md section 7): the online one
whose client_id sorts first, judged from the others' retained availability and info. An
instance takes part only once the broker has handed it the retained messages: a marker it
publishes to itself comes back after them (`synced`).
"""

from __future__ import annotations

import json
import uuid

from mqtt_starter.core.monitoring import Peer, leader


class Election:
    """The peers seen, whether this instance is synced, and whether it leads."""

    def __init__(self) -> None:
        self.peers: dict[str, Peer] = {}
        self.synced = False
        self.leading = False
        self._marker = b""

    def new_marker(self) -> bytes:
        """After (re)subscribing: the marker to publish to oneself; not synced until it is back."""
        self.synced = False
        self._marker = uuid.uuid4().hex.encode()
        return self._marker

    def lost(self) -> None:
        """The broker link is gone: nothing is known until the next marker comes back."""
        self.synced = False

    def availability(self, name: str, payload: bytes) -> None:
        peer = self.peers.get(name, Peer())
        self.peers[name] = Peer(online=payload == b"online", monitor=peer.monitor)

    def info(self, name: str, payload: bytes) -> None:
        peer = self.peers.get(name, Peer())
        self.peers[name] = Peer(online=peer.online, monitor=_json_field(payload, "monitor") is True)

    def marker(self, payload: bytes) -> None:
        if self._marker and payload == self._marker:
            self.synced = True

    def decide(self, own: str, enabled: bool) -> bool:
        """Whether this instance leads now; True when that changed."""
        others = {k: v for k, v in self.peers.items() if k != own}
        leading = enabled and self.synced and leader(own, others) == own
        changed = leading != self.leading
        self.leading = leading
        return changed


def json_object(payload: bytes) -> object:
    """A payload as JSON; None when it is not."""
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None


def _json_field(payload: bytes, key: str) -> object:
    data = json_object(payload)
    return data.get(key) if isinstance(data, dict) else None
