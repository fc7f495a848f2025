"""Chains: when a run the monitor publishes ends, start the next (DESIGN.md section 11).

Only the monitoring instance publishes runs, so only it fires chains: one request per chain
and upstream run, through the same request service as every door (resolution, allow-list,
`policy.on_running`, log line, metrics, status events), with requestId
`chain:<name>:<upstream executionId>` (a repeated upstream end is a repeat) and its replies on
`<base>/reply/chain/<name>`. The lineage of each run a chain starts is kept (bounded), so that
a chain never starts a task that already ran in the same lineage (`chain_loop`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from loguru import logger

from mqtt_starter.config import Settings
from mqtt_starter.core.chains import Chain
from mqtt_starter.core.codec import encode_reply
from mqtt_starter.core.model import (
    Execution,
    Reply,
    Selector,
    SelectorKind,
    TaskRef,
    TaskResult,
)
from mqtt_starter.service.parts import Parts
from mqtt_starter.service.requests import Inbound, Starter

Spawn = Callable[[Coroutine[Any, Any, None], str], object]
# Runs started by chains whose lineage is remembered: enough for many intervals of runs.
LINEAGES_KEPT = 10_000


class Publisher(Protocol):
    """Where a chain's replies go (`<base>/reply/chain/<name>`): the daemon's reply
    publisher, which holds them while the broker is away."""

    async def publish(self, topic: str, payload: bytes) -> None: ...


def build_chains(settings: Settings) -> tuple[Chain, ...]:
    """The configured chains, as the core decides with them."""
    return tuple(
        Chain(
            name=c.name,
            after_ids=frozenset(i.strip().lower() for i in c.after.task_ids),
            after_tags=frozenset(t.casefold() for t in c.after.tags),
            after_names=frozenset(n.casefold() for n in c.after.names),
            on=c.on,
            start=(
                *(Selector(SelectorKind.ID, v) for v in c.start.task_ids),
                *(Selector(SelectorKind.TAG, v) for v in c.start.tags),
                *(
                    Selector(SelectorKind.CUSTOM_PROPERTY, cp.value, cp.name)
                    for cp in c.start.custom_properties
                ),
                *(Selector(SelectorKind.NAME, v) for v in c.start.names),
            ),
            wait=c.wait,
        )
        for c in settings.chains
    )


class Chains:
    """Fires the chains a run that ended fires."""

    def __init__(
        self,
        parts: Callable[[], Parts],
        starter: Starter,
        publisher: Publisher,
        spawn: Spawn,
    ) -> None:
        self._parts = parts
        self._starter = starter
        self._publisher = publisher
        self._spawn = spawn
        # Execution id → the tasks that ran before it in its lineage (its own task included).
        self._lineages: OrderedDict[str, frozenset[str]] = OrderedDict()

    def run_ended(self, change: Execution, task: TaskRef) -> None:
        """The monitor published that a run ended: fire the chains it fires."""
        parts = self._parts()
        lineage = self._lineages.get(change.execution_id.lower(), frozenset()) | {task.id}
        for chain in build_chains(parts.settings):
            if chain.fires(task, change.status):
                self._spawn(
                    self._fire(parts, chain, change.execution_id, lineage),
                    f"chain-{chain.name}-{change.execution_id}",
                )

    async def _fire(
        self, parts: Parts, chain: Chain, execution_id: str, lineage: frozenset[str]
    ) -> None:
        topic = f"{parts.base}/reply/chain/{chain.name}"
        accepted_sent = asyncio.Event()

        async def send(reply: Reply) -> None:
            await self._publisher.publish(topic, encode_reply(reply, parts.instance))

        async def finished(reply: Reply) -> None:
            await accepted_sent.wait()  # the finished reply never overtakes the accepted one
            await send(reply)

        request = chain.request(execution_id, lineage)
        inbound = Inbound(request, door="chain", topic=f"chain/{chain.name}", kind="chain")
        try:
            reply = await self._starter.handle(inbound, on_finished=finished)
            for outcome in reply.outcomes:
                if outcome.result is TaskResult.STARTED and outcome.execution_id:
                    self._remember(outcome.execution_id, lineage)
            await send(reply)
        except Exception:
            # One chain's failure is its own: logged with the chain and the upstream run.
            logger.exception("chain {} for execution {} failed", chain.name, execution_id)
        finally:
            accepted_sent.set()

    def _remember(self, execution_id: str, lineage: frozenset[str]) -> None:
        self._lineages[execution_id.lower()] = lineage
        while len(self._lineages) > LINEAGES_KEPT:
            self._lineages.popitem(last=False)
