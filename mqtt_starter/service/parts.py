"""The parts a configuration makes: the backend, the trigger rules, the allow-list.

A reload builds a new Parts and swaps it in; the old one is retired, and its backend closed
once nothing uses it (requests in flight and followers each hold it while they run), so a
reload never breaks work in flight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loguru import logger

from mqtt_starter.config import PolicySettings, Settings
from mqtt_starter.core.model import Selector, SelectorKind
from mqtt_starter.core.policy import AllowList
from mqtt_starter.core.routing import Route, TopicFilter, When
from mqtt_starter.core.triggers import TriggerRules
from mqtt_starter.service.follow import Tracker
from mqtt_starter.sites.base import Backend
from mqtt_starter.sites.qrs import Observer, QrsClient


def allow_list(policy: PolicySettings) -> AllowList | None:
    allow = policy.allow
    if allow is None:
        return None
    return AllowList.build(
        allow.task_ids,
        allow.tags,
        [(cp.name, cp.value) for cp in allow.custom_properties],
        allow.spaces,
    )


PAYLOAD_AS = {
    "task_id": SelectorKind.ID,
    "name": SelectorKind.NAME,
    "tag": SelectorKind.TAG,
}


def build_routes(settings: Settings) -> tuple[Route, ...]:
    routes = []
    for r in settings.routes:
        selectors = (
            *(Selector(SelectorKind.ID, v) for v in r.task_ids),
            *(Selector(SelectorKind.TAG, v) for v in r.tags),
            *(
                Selector(SelectorKind.CUSTOM_PROPERTY, cp.value, cp.name)
                for cp in r.custom_properties
            ),
            *(Selector(SelectorKind.NAME, v) for v in r.names),
        )
        when = When(r.when.field, r.when.equals) if r.when else None
        payload_as = PAYLOAD_AS[r.payload_as] if r.payload_as else None
        routes.append(Route(TopicFilter.parse(r.topic), selectors, when, r.debounce_s, payload_as))
    return tuple(routes)


def build_rules(settings: Settings) -> TriggerRules:
    return TriggerRules(
        base=settings.mqtt.base_topic,
        routes=build_routes(settings),
        reply_allow=tuple(TopicFilter.parse(f) for f in settings.mqtt.reply_topic_allow),
        accept_retained=settings.mqtt.accept_retained,
        max_payload_bytes=settings.policy.max_payload_bytes,
    )


async def open_backend(settings: Settings, observer: Observer | None = None) -> Backend:
    """The backend the settings name, started (ConfigError when its files cannot be used)."""
    if settings.cloud is not None:
        from mqtt_starter.sites.cloud import CloudClient

        cloud = CloudClient(
            settings.cloud,
            log_tail_lines=settings.monitor.log_tail_lines,
            observer=observer,
        )
        await cloud.start()
        return cloud
    assert settings.qrs is not None
    client = QrsClient(settings.qrs, observer=observer)
    await client.start()
    return client


@dataclass
class Parts:
    """What a configuration builds: the backend, the rules, the allow-list, the tracker."""

    settings: Settings
    backend: Backend
    rules: TriggerRules
    allow: AllowList | None
    # One follower loop per backend: every run started through these parts is polled in it.
    tracker: Tracker = field(init=False, repr=False)
    _users: int = 0
    _retired: bool = False
    _closed: bool = field(default=False, repr=False)
    _owns_backend: bool = True

    def __post_init__(self) -> None:
        self.tracker = Tracker(self.backend, self.settings.site.poll_interval_s)

    @classmethod
    async def build(cls, settings: Settings, observer: Observer | None = None) -> Parts:
        backend = await open_backend(settings, observer)
        return cls(settings, backend, build_rules(settings), allow_list(settings.policy))

    def successor(self, settings: Settings, rules: TriggerRules, allow: AllowList | None) -> Parts:
        """New parts on the same backend (the QRS settings did not change); the backend is
        theirs to close from now on."""
        self._owns_backend = False
        successor = Parts(settings, self.backend, rules, allow)
        successor.tracker = self.tracker  # same backend, same poll: one query serves both
        return successor

    @property
    def instance(self) -> str:
        return self.settings.mqtt.client_id

    @property
    def base(self) -> str:
        return self.settings.mqtt.base_topic

    def hold(self) -> None:
        """One more user: the backend stays open until `release`."""
        self._users += 1

    async def release(self) -> None:
        self._users -= 1
        if self._retired and self._users == 0:
            await self._close()

    def in_use(self) -> _InUse:
        """Hold these parts (their backend stays open) for the duration of an `async with`."""
        return _InUse(self)

    async def retire(self) -> None:
        """No new work takes these parts; they close once the last user is done."""
        self._retired = True
        if self._users == 0:
            await self._close()

    async def _close(self) -> None:
        if not self._closed and self._owns_backend:
            self._closed = True
            await self.tracker.close()
            await self.backend.close()
            logger.debug("the previous QRS client is closed: nothing uses it any more")


class _InUse:
    """`async with parts.in_use():` as a plain class: every request enters one, and a
    generator-based context manager costs several times as much."""

    __slots__ = ("_parts",)

    def __init__(self, parts: Parts) -> None:
        self._parts = parts

    async def __aenter__(self) -> Parts:
        self._parts.hold()
        return self._parts

    async def __aexit__(self, *exc: object) -> None:
        await self._parts.release()
