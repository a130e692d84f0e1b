"""Delivering the outbox: each (notification, plugin) on its own, with a
timeout, bounded retries and exponential backoff, off the main loop's
critical path. A plugin that raises or hangs delays only its own deliveries."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from .log import notify_logger
from .plugins import DeliveryError, NotifierManager
from .state import AlertStateStore, OutboxItem

__all__ = ("Dispatcher",)

POLL_SECONDS = 0.5


class Dispatcher:
    def __init__(
        self,
        store: AlertStateStore,
        manager: NotifierManager,
        *,
        timeout: float,
        max_attempts: int,
        backoff: float = 1.0,
        max_backoff: float = 300.0,
    ) -> None:
        self.store = store
        self.manager = manager
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.outcomes: Counter[tuple[str, str]] = Counter()  # (plugin, delivered|failed|dropped)
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """New rows in the outbox: look now rather than at the next poll."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for item in self.store.due(time.time()):
                key = (item.notification.id, item.plugin)
                # One delivery at a time per plugin, so that it gets them in order.
                if not any(plugin == item.plugin for _, plugin in self._inflight):
                    self._inflight[key] = asyncio.create_task(self._deliver(item, key))
            self._wake.clear()
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            await asyncio.wait(waiters, timeout=POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    async def drain(self, timeout: float) -> None:
        """Give the deliveries under way a moment to finish (at shutdown)."""
        if self._inflight:
            await asyncio.wait(list(self._inflight.values()), timeout=timeout)
        for task in self._inflight.values():
            task.cancel()

    async def _deliver(self, item: OutboxItem, key: tuple[str, str]) -> None:
        try:
            await self.manager.deliver(item.plugin, item.notification, self.timeout)
        except DeliveryError as exc:
            self._failed(item, str(exc))
        else:
            self.store.delivered(item)
            self.outcomes[(item.plugin, "delivered")] += 1
            notify_logger.info(
                "%s: delivered %s notification %s", item.plugin, item.notification.state, item.notification.id
            )
        finally:
            self._inflight.pop(key, None)
            self.wake()  # the plugin's next notification may go now

    def _failed(self, item: OutboxItem, reason: str) -> None:
        attempts = item.attempts + 1
        self.outcomes[(item.plugin, "failed")] += 1
        if attempts >= self.max_attempts:
            self.store.delivered(item)  # given up: out of the outbox
            self.outcomes[(item.plugin, "dropped")] += 1
            notify_logger.error(
                "%s: giving up on notification %s after %d attempts: %s",
                item.plugin,
                item.notification.id,
                attempts,
                reason,
            )
            return
        delay = min(self.backoff * 2 ** (attempts - 1), self.max_backoff)
        self.store.retry_later(item, reason, time.time() + delay)
        notify_logger.warning(
            "%s: notification %s not delivered (attempt %d of %d): %s; retrying in %.1f s",
            item.plugin, item.notification.id, attempts, self.max_attempts, reason, delay,
        )  # fmt: skip
