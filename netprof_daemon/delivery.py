"""Delivering the outbox: each (notification, plugin) on its own, with a
timeout, bounded retries and exponential backoff, off the main loop's
critical path. A plugin that raises or hangs delays only its own deliveries."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections import Counter
from collections.abc import Callable

from .log import notify_logger
from .plugins import DeliveryError, NotifierManager
from .state import AlertStateStore, OutboxItem

__all__ = ("Dispatcher",)

POLL_SECONDS = 0.5
UNRECORDED_RETRY_SECONDS = 30.0  # a failure the outbox could not be told of: tried again after this


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
        self._outbox_failing = False  # logged once while the outbox cannot be read
        # Delivered, but the outbox could not be told (a full disk): not sent
        # again while this process lives; their removal is retried instead.
        self._unrecorded: set[tuple[str, str]] = set()
        self._not_before: dict[tuple[str, str], float] = {}  # failed, and the outbox could not be told

    def wake(self) -> None:
        """New rows in the outbox: look now rather than at the next poll."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for item in self._due():
                key = (item.notification.id, item.plugin)
                if key in self._unrecorded:
                    self._record(item, functools.partial(self.store.delivered, item))
                    continue
                if self._not_before.get(key, 0.0) > time.time():
                    continue
                # One delivery at a time per plugin, so that it gets them in order.
                if not any(plugin == item.plugin for _, plugin in self._inflight):
                    self._inflight[key] = asyncio.create_task(self._deliver(item, key))
            self._wake.clear()
            waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            await asyncio.wait(waiters, timeout=POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            for waiter in waiters:
                waiter.cancel()

    def _due(self) -> list[OutboxItem]:
        """The outbox's due items; none while it cannot be read (the loop goes
        on: a dead dispatcher would never deliver again)."""
        try:
            items = self.store.due(time.time())
        except sqlite3.Error as exc:
            if not self._outbox_failing:
                notify_logger.error("cannot read the outbox: %s; deliveries wait until it can be read", exc)
            self._outbox_failing = True
            return []
        if self._outbox_failing:
            notify_logger.info("the outbox can be read again; deliveries go on")
        self._outbox_failing = False
        return items

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
            if not self._record(item, functools.partial(self._failed, item, str(exc))):
                self._not_before[key] = time.time() + UNRECORDED_RETRY_SECONDS
        else:
            self.outcomes[(item.plugin, "delivered")] += 1
            notify_logger.info(
                "%s: delivered %s notification %s", item.plugin, item.notification.state, item.notification.id
            )
            if not self._record(item, functools.partial(self.store.delivered, item)):
                self._unrecorded.add(key)
        finally:
            self._inflight.pop(key, None)
            self.wake()  # the plugin's next notification may go now

    def _record(self, item: OutboxItem, write: Callable[[], None]) -> bool:
        """An outcome into the outbox; False when it cannot be written (the row
        stays as it was: a restart sends it again, with the same id)."""
        key = (item.notification.id, item.plugin)
        try:
            write()
        except sqlite3.Error as exc:
            if key not in self._unrecorded:  # once per notification, not per retry
                notify_logger.error(
                    "%s: cannot record the outcome of notification %s in the outbox: %s",
                    item.plugin, item.notification.id, exc,
                )  # fmt: skip
            return False
        self._unrecorded.discard(key)
        self._not_before.pop(key, None)
        return True

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
