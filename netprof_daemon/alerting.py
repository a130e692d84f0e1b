"""One tick of alerting: evaluate every rule over the daemon's windows,
advance each alert's lifecycle, apply auto-disable actions, and put the due
notifications in the outbox (delivered by :mod:`delivery`)."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Mapping

from netprof_core import SegmentControl

from . import actions
from .actions import ControlMemory
from .alerts import AlertEngine
from .config import DaemonConfig
from .delivery import Dispatcher
from .log import alert_logger
from .plugins import NotifierManager
from .rules import Rule, evaluate
from .state import AlertStateStore
from .store import AppState, SegmentStore
from .windows import Window, WindowHistory

__all__ = ("Alerting",)


class Alerting:
    def __init__(
        self, config: DaemonConfig, manager: NotifierManager, state: AlertStateStore, memory: ControlMemory
    ) -> None:
        self.manager = manager
        self.memory = memory  # so that processes started later stay auto-disabled too
        self.state = state
        settings = config.daemon
        self.engine = AlertEngine(
            group_wait=settings.group_wait_seconds,
            repeat_interval=settings.repeat_interval_seconds,
            notify=config.profiling.enable_alerts,
        )
        state.restore(self.engine)  # never raises: what does not fit is dropped, logged
        try:
            undelivered = state.retry_all_now(time.time())
        except sqlite3.Error as exc:  # they stay due at their own time
            alert_logger.error("cannot reschedule the undelivered notifications: %s", exc)
            undelivered = 0
        if undelivered:
            alert_logger.info(
                "%d notification deliveries left from before the restart: sending them", undelivered
            )
        self.dispatcher = Dispatcher(
            state, manager, timeout=settings.notify_timeout_seconds, max_attempts=settings.notify_max_attempts
        )
        self.rules: list[Rule] = config.all_rules()
        # The auto-disables this daemon made: a running count by app (kept in the
        # state, as /metrics must never show it going down), and recent times.
        self.auto_disables: Counter[str] = Counter(state.load_extra().get("auto_disables", {}))
        self._auto_disable_times: list[tuple[float, str]] = []

    def reconfigure(self, config: DaemonConfig) -> None:
        self.rules = config.all_rules()
        self.engine.group_wait = config.daemon.group_wait_seconds
        self.engine.repeat_interval = config.daemon.repeat_interval_seconds
        self.engine.notify = config.profiling.enable_alerts

    def tick(
        self, apps: Mapping[str, AppState], history: WindowHistory, store: SegmentStore, now_ns: int
    ) -> None:
        cache: dict[tuple[float, bool], Mapping[str, Window]] = {}

        def window_of(seconds: float, histograms: bool) -> Mapping[str, Window]:
            if (seconds, histograms) not in cache:
                cache[(seconds, histograms)] = history.window(
                    dict(apps), now_ns, seconds, histograms=histograms
                )
            return cache[(seconds, histograms)]

        now = now_ns / 1e9

        def made_since(app: str, seconds: float) -> int:
            return sum(1 for at, which in self._auto_disable_times if which == app and now - at <= seconds)

        samples = [s for rule in self.rules for s in evaluate(rule, apps, window_of, made_since)]
        self.engine.observe(samples, self.rules, now)
        for alert in self.engine.newly_firing:
            alert_logger.warning("firing: %s", alert.summary)
            if alert.action == "disable":
                self._auto_disable(store, alert.labels["app"], alert.rule, now)
        forgotten = self.engine.prune(now)
        notifications = self.engine.due(now)
        if self.engine.changed or notifications or forgotten:
            extra = {"auto_disables": dict(self.auto_disables)}
            try:
                self.state.save(
                    self.engine, notifications, self.manager.active, extra=extra, forgotten_silences=forgotten
                )
            except Exception:
                self.engine.requeue(notifications)  # kept for the next tick's save
                raise
        if notifications:
            self.dispatcher.wake()

    def _auto_disable(self, store: SegmentStore, app: str, rule: str, now: float) -> None:
        # The app's verified processes only: a segment whose writer the kernel did not
        # confirm may speak for another process, which must not pay for its data.
        targets = store.identity.only_verified(store.live(app))
        result = actions.apply(targets, SegmentControl.auto_disable, f"auto-disable ({rule})")
        self.memory.auto_disabled.add(app)
        if result.segments:
            self.auto_disables[app] += 1
            self._auto_disable_times = [(at, a) for at, a in self._auto_disable_times if now - at < 3600]
            self._auto_disable_times.append((now, app))
            alert_logger.error(
                "auto-disabled profiling of %s in %d process(es) (rule %s); POST .../enable or .../reset-errors lifts it",
                app, result.segments, rule,
            )  # fmt: skip
