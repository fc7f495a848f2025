"""Finding apps on a Qlik Cloud tenant: by id (batched), tag (a public collection), exact name
(the API matches loosely: compared here) and space; an app's tags come with its item
(`meta.tags`), and its newest reload tells whether it is running (for `policy.on_running`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from mqtt_starter.core.model import (
    Selector,
    SelectorKind,
    TaskRef,
    TaskStatus,
)
from mqtt_starter.sites.cloud_api import (
    PAGE,
    STATES,
    CloudApi,
    _item_tags,
)


class CloudApps:
    """The tenant's apps as tasks; spaces and collections remembered by name."""

    def __init__(self, api: CloudApi) -> None:
        self.api = api
        self._spaces: dict[str, str] = {}  # space id → name
        self._collections: dict[str, list[str]] = {}  # tag → collection ids

    async def _collection_ids(self, tag: str) -> list[str]:
        if tag not in self._collections:
            found = await self.api.list("api/v1/collections", {"type": "public", "name": tag})
            self._collections[tag] = [
                str(c["id"]) for c in found if c.get("name") == tag and c.get("id")
            ]
        return self._collections[tag]

    async def _space_name(self, space_id: str) -> str:
        if space_id and space_id not in self._spaces:
            for space in await self.api.list("api/v1/spaces", {}):
                self._spaces[str(space.get("id"))] = str(space.get("name", ""))
            self._spaces.setdefault(space_id, "")
        return self._spaces.get(space_id, "")

    async def find_tasks(self, selectors: Sequence[Selector]) -> list[TaskRef]:
        items: dict[str, dict[str, Any]] = {}
        tags: dict[str, set[str]] = {}

        def take(found: list[dict[str, Any]], tag: str | None = None) -> None:
            for item in found:
                app_id = str(item.get("resourceId", "")).lower()
                if app_id:
                    items.setdefault(app_id, item)
                    if tag is not None:
                        tags.setdefault(app_id, set()).add(tag)

        ids = [s.value for s in selectors if s.kind is SelectorKind.ID]
        for i in range(0, len(ids), PAGE):
            take(
                await self.api.list(
                    "api/v1/items",
                    {"resourceType": "app", "resourceIds": ",".join(ids[i : i + PAGE])},
                )
            )
        for s in selectors:
            if s.kind is SelectorKind.TAG:
                for collection in await self._collection_ids(s.value):
                    found = await self.api.list(
                        "api/v1/items", {"resourceType": "app", "collectionId": collection}
                    )
                    take(found, s.value)
            elif s.kind is SelectorKind.NAME:
                found = await self.api.list(
                    "api/v1/items", {"resourceType": "app", "name": s.value}
                )
                take([i for i in found if str(i.get("name", "")).casefold() == s.value.casefold()])
            elif s.kind is SelectorKind.SPACE:
                spaces = await self.api.list("api/v1/spaces", {"name": s.value})
                for space in spaces:
                    if str(space.get("name", "")).casefold() == s.value.casefold():
                        self._spaces[str(space["id"])] = str(space["name"])
                        found = await self.api.list(
                            "api/v1/items", {"resourceType": "app", "spaceId": str(space["id"])}
                        )
                        take(found)
        return list(
            await asyncio.gather(
                *(self._task(item, tags.get(app_id, set())) for app_id, item in items.items())
            )
        )

    async def _task(
        self, item: Mapping[str, Any], tags: set[str], *, with_state: bool = True
    ) -> TaskRef:
        """The app as a task. `with_state`: its newest reload gives `last_status`, so that the
        policy sees a reloading app as running (`policy.on_running`), as on QRS."""
        app_id = str(item.get("resourceId", "")).lower()
        name = str(item.get("name", ""))
        tags = tags | _item_tags(item)
        status, reload_id = TaskStatus.NEVER_STARTED, ""
        if with_state:
            data = await self.api.json("api/v1/reloads", {"appId": app_id, "limit": "1"})
            newest = data.get("data") if isinstance(data, dict) else None
            if newest and isinstance(newest[0], dict):
                status = STATES.get(str(newest[0].get("status")), TaskStatus.NEVER_STARTED)
                reload_id = str(newest[0].get("id", ""))
        return TaskRef(
            id=app_id,
            name=name,
            tags=tuple(sorted(tags)),
            last_status=status,
            app_id=app_id,
            app_name=name,
            space=await self._space_name(str(item.get("spaceId") or "")),
            last_result_id=reload_id,
        )

    async def all_tasks(self) -> list[TaskRef]:
        """Every app, without its state (one call per app would be too many here)."""
        found = await self.api.list("api/v1/items", {"resourceType": "app"})
        return [await self._task(i, set(), with_state=False) for i in found]
