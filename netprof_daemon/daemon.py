"""netprofd's lifecycle: ``serve()`` = ``startup()``, the main loop, ``shutdown()``.

One obvious main loop: every tick, snapshot every segment, keep a checkpoint
for the windows, ping the watchdog. The HTTP API reads what the last tick left
and writes control blocks; it never waits for the loop. Signal handlers are
installed by the CLI only; the daemon offers ``request_stop()`` and
``request_reload()``.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from netprof_core import ConfigError, SegmentControl, SegmentError, read_segment

from . import actions
from .actions import ActionResult, ControlMemory
from .alerting import Alerting
from .api import make_app
from .config import DaemonConfig, load_daemon_config
from .log import daemon_logger
from .metrics import NetprofCollector
from .plugins import NotifierManager
from .procstat import ProcessUsage, read_rss_bytes
from .silences import parse_silence
from .state import AlertStateStore
from .store import AppState, SegmentStore
from .summary import quantiles, record_json
from .systemd import notify, watchdog_interval
from .windows import WindowHistory

__all__ = ("Daemon",)


class Daemon:
    def __init__(self, config: DaemonConfig, manager: NotifierManager, *, api_key: str | None = None) -> None:
        """``manager``: the notifier plugins, loaded (its config checked) by the caller."""
        self.config = config
        self.api_key = api_key
        self.manager = manager
        self.alerting: Alerting | None = None
        self.store = SegmentStore(config.profiling.segment_dir, config.daemon.state_dir)
        self.memory = ControlMemory()
        self.store.on_discover = self.memory.catch_up
        self.history = WindowHistory()
        self.usage = ProcessUsage()
        self.apps: dict[str, AppState] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NetprofCollector(self))
        self.started = time.monotonic()
        self.bound: list[tuple[str, int]] = []
        self._stop = asyncio.Event()
        self._reload_wanted = False
        self._runner: web.AppRunner | None = None
        self._last_tick_mono: float | None = None
        self._last_watchdog = 0.0
        self._dispatching: asyncio.Task[None] | None = None
        self._state: AlertStateStore | None = None

    # -- lifecycle ------------------------------------------------------------

    async def serve(self) -> None:
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        self.store.lock()
        self._state = AlertStateStore(self.config.daemon.state_dir)
        self.alerting = Alerting(self.config, self.manager, self._state, self.memory)
        self._dispatching = asyncio.create_task(self.alerting.dispatcher.run(self._stop))
        self.tick()
        self._runner = web.AppRunner(make_app(self, self.api_key), handle_signals=False, access_log=None)
        await self._runner.setup()
        settings = self.config.daemon
        site = web.TCPSite(self._runner, settings.host, settings.port, reuse_address=True)
        await site.start()
        server = site._server  # aiohttp keeps the asyncio server private
        for sock in getattr(server, "sockets", None) or ():
            self.bound.append(sock.getsockname()[:2])
        daemon_logger.info(
            "netprofd listening on %s, reading %s (%d processes)",
            ", ".join(f"{h}:{p}" for h, p in self.bound),
            self.store.segment_dir,
            len(self.store.entries),
        )
        notify("READY=1", self._status())

    async def main_loop(self) -> None:
        interval = self.config.daemon.tick_seconds
        watchdog = watchdog_interval()
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass
            if self._stop.is_set():
                break
            if self._reload_wanted:
                self._reload_wanted = False
                try:
                    self.reload()
                except Exception:  # noqa: BLE001  (a failed reload keeps the running config, never the daemon down)
                    daemon_logger.exception("reload failed; keeping the running config")
            self.tick()
            if watchdog is not None and time.monotonic() - self._last_watchdog >= watchdog:
                notify("WATCHDOG=1", self._status())
                self._last_watchdog = time.monotonic()

    async def shutdown(self) -> None:
        notify("STOPPING=1")
        self._stop.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._dispatching is not None:
            await self._dispatching
        if self.alerting is not None:
            await self.alerting.dispatcher.drain(timeout=2.0)  # what is not delivered stays in the outbox
        self.manager.close()
        if self._state is not None:
            self._state.close()
        self.store.close()
        daemon_logger.info("netprofd stopped")

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        """Reload the config file at the next tick (safe to call from a signal handler)."""
        self._reload_wanted = True

    # -- one tick ---------------------------------------------------------------

    def tick(self) -> None:
        self._refresh_store()
        self.apps = self.store.apps()
        self.history.add(self.store.last_tick_ns, self.apps)
        self.usage.sample({entry.pid for entry in self.store.live()})
        if self.alerting is not None:
            try:
                self.alerting.tick(self.apps, self.history, self.store, self.store.last_tick_ns)
            except Exception:  # noqa: BLE001  (a bug in alerting must not stop the snapshots)
                daemon_logger.exception("alert evaluation failed; snapshots go on")
        self._last_tick_mono = time.monotonic()

    def last_tick_age(self) -> float | None:
        return None if self._last_tick_mono is None else time.monotonic() - self._last_tick_mono

    def uptime_seconds(self) -> float:
        return time.monotonic() - self.started

    def _status(self) -> str:
        requests = sum(state.counters.requests for state in self.apps.values())
        return (
            f"STATUS={len(self.store.entries)} processes, {len(self.apps)} apps, {requests} requests recorded"
        )

    # -- reload (SIGHUP) ----------------------------------------------------------

    def reload(self) -> bool:
        """Read the config file again; a bad one keeps the old config. The
        run-time settings it holds are pushed into every segment."""
        source = self.config.source
        try:
            new = load_daemon_config(source)
        except ConfigError as exc:
            daemon_logger.error("reload of %s failed; keeping the running config:\n%s", source, exc)
            notify(f"STATUS=reload failed: {exc.problems[0] if exc.problems else exc}")
            return False
        try:
            self.manager.configure(new.notifiers)
        except ConfigError as exc:
            daemon_logger.error("reload of %s failed; keeping the running config:\n%s", source, exc)
            return False
        if self.alerting is not None:
            self.alerting.reconfigure(new)
        if (
            new.daemon.listen != self.config.daemon.listen
            or new.profiling.segment_dir != self.config.profiling.segment_dir
        ):
            daemon_logger.warning("listen and segment_dir take effect at the next restart, not on reload")
        self.config = new
        self.memory.config = new.profiling
        self.memory.enabled.clear()
        self.memory.retention_seconds = None
        result = self.apply(
            None, lambda c: actions.push_settings(c, new.profiling), "apply the reloaded config"
        )
        daemon_logger.info("reloaded %s; settings pushed to %d segment(s)", source, result.segments)
        notify("RELOADING=0", self._status())  # RELOADING=0 is ignored; the STATUS line is what shows
        return True

    # -- control, for the API -------------------------------------------------------

    def apply(self, app: str | None, action: Callable[[SegmentControl], None], what: str) -> ActionResult:
        return actions.apply(self.store.live(app), action, what)

    def feature_flag_off(self, app: str | None) -> str | None:
        """Why enabling is refused (the feature flag is off), or None."""
        if not self.config.profiling.feature_flag_enabled:
            return (
                f"feature_flag_enabled is false in {self.config.source}: set it to true and reload netprofd"
            )
        for entry in self.store.live(app):
            if not entry.snapshot.control.feature_flag_enabled:
                return (
                    f"feature_flag_enabled is false for app {entry.app!r} (pid {entry.pid}): "
                    "set it to true in the configuration and reload netprofd"
                )
        return None

    def set_enabled(self, app: str | None, on: bool) -> ActionResult:
        self.memory.remember_enabled(app, on)
        action = SegmentControl.enable if on else SegmentControl.disable
        result = self.apply(app, action, "enable" if on else "disable")
        self._refresh_now()
        return result

    def reset_errors(self, app: str | None) -> ActionResult:
        self.memory.lift_auto_disable(app)
        return self.apply(app, SegmentControl.reset_errors, "reset errors")

    def set_retention(self, app: str | None, seconds: float) -> ActionResult:
        if app is None:
            self.memory.retention_seconds = seconds
        return self.apply(app, lambda c: c.set_retention(seconds), f"set retention to {seconds:g} s")

    def _refresh_now(self) -> None:
        """Show a control change at once rather than at the next tick (through
        the store, which keeps its running sums in step with each snapshot)."""
        self._refresh_store()
        self.apps = self.store.apps()

    def _refresh_store(self) -> None:
        try:
            self.store.refresh()
        except OSError as exc:  # the directory itself is unreadable: report, keep serving
            daemon_logger.error("cannot read %s: %s", self.store.segment_dir, exc)
        except Exception:  # noqa: BLE001  (a bug of ours must not end the daemon)
            daemon_logger.exception("reading the segments failed; the last snapshots stand")

    # -- views, for the API ---------------------------------------------------------

    def overhead_by_app(self, seconds: float = 60.0) -> dict[str, float]:
        """Mean ns per timed record() over the last ``seconds``, per app (since
        start when nothing was timed in the window)."""
        windows = self.history.window(self.apps, self.store.last_tick_ns, seconds, histograms=False)
        means = {}
        for name, state in self.apps.items():
            recent = windows[name].counters
            means[name] = (
                recent.overhead_mean_ns if recent.overhead_count else state.counters.overhead_mean_ns
            )
        return means

    def memory_usage(self, app: str | None) -> dict[str, Any]:
        limit_mb = self.config.profiling.max_memory_mb
        segments: list[dict[str, Any]] = []
        for entry in self.store.live(app):
            size = entry.snapshot.memory_bytes
            segments.append(
                {
                    "app": entry.app,
                    "pid": entry.pid,
                    "path": entry.path,
                    "memory_mb": round(size / 2**20, 4),
                    "memory_bytes": size,
                    "ring_capacity": entry.snapshot.header.ring_capacity,
                    "records_stored": min(
                        entry.snapshot.counters.requests, entry.snapshot.control.ring_capacity
                    ),
                    "percent_of_max": round(100 * size / 2**20 / limit_mb, 2),
                }
            )
        total = sum(s["memory_bytes"] for s in segments)
        rss = read_rss_bytes()
        return {
            "total_mb": round(total / 2**20, 4),
            "total_bytes": total,
            "max_memory_mb": limit_mb,
            "within_limit": all(s["memory_mb"] <= limit_mb for s in segments),
            "segments": segments,
            "daemon_rss_mb": round(rss / 2**20, 2) if rss is not None else None,
        }

    def production_metrics(self, app: str | None) -> dict[str, Any]:
        overhead_now = self.overhead_by_app()
        apps = []
        for name, state in sorted(self.apps.items()):
            if app not in (None, name):
                continue
            counters = state.counters
            p99 = quantiles(counters.overhead_histogram, [0.99])[0]
            live = state.processes
            apps.append(
                {
                    "app": name,
                    "overhead": {
                        "mean_ms": round(counters.overhead_mean_ns / 1e6, 6),
                        "last_minute_mean_ms": round(overhead_now.get(name, 0.0) / 1e6, 6),
                        "p99_ms": None if math.isnan(p99) else round(p99 / 1e6, 6),
                        "max_ms": round(counters.overhead_max_ns / 1e6, 6),
                        "timed_records": counters.overhead_count,
                    },
                    "memory_mb": round(sum(e.snapshot.memory_bytes for e in live) / 2**20, 4),
                    "requests": counters.requests,
                    "sampled_out": counters.sampled_out,
                    "internal_errors": counters.internal_errors,
                    "consecutive_errors": max(
                        (e.snapshot.counters.consecutive_errors for e in live), default=0
                    ),
                    "auto_disable_events": counters.auto_disable_events,
                    "auto_disabled_processes": sum(e.snapshot.control.auto_disabled for e in live),
                    "enabled": any(e.snapshot.control.recording for e in live),
                    "recording_processes": sum(e.snapshot.control.recording for e in live),
                    "sample_rate": min((e.snapshot.control.sample_rate for e in live), default=None),
                    "process_count": len(live),
                    "processes": [{"pid": e.pid, **self.usage.usage(e.pid)} for e in live],
                }
            )
        rss = read_rss_bytes()
        return {
            "daemon": {
                "uptime_seconds": round(self.uptime_seconds(), 3),
                "pid": os.getpid(),
                "rss_mb": round(rss / 2**20, 2) if rss is not None else None,
                "tick_seconds": self.config.daemon.tick_seconds,
                "last_tick_duration_ms": round(self.store.last_tick_seconds * 1e3, 3),
            },
            "applications": apps,
        }

    # -- alerts, for the API ------------------------------------------------------------

    def _alerting(self) -> Alerting:
        if self.alerting is None:
            raise RuntimeError("netprofd has not started")
        return self.alerting

    def alerts_view(self, history: int) -> dict[str, Any]:
        alerting = self._alerting()
        engine, now = alerting.engine, time.time()
        active = [
            {
                **alert.to_alert("firing", now).to_json(),
                "state": alert.phase,
                "pending_since": alert.pending_since,
            }
            for alert in sorted(engine.active.values(), key=lambda a: (a.rule, sorted(a.labels.items())))
        ]
        delivery: dict[str, dict[str, int]] = {}
        for (plugin, outcome), count in alerting.dispatcher.outcomes.items():
            delivery.setdefault(plugin, {})[outcome] = count
        return {
            "enabled": self.config.profiling.enable_alerts,
            "active": active,
            "history": engine.history[-history:][::-1] if history else [],
            "silences": [s.to_json(now) for s in engine.silences.values() if s.ends_at > now],
            "rules": [
                {
                    "name": r.name,
                    "metric": r.metric,
                    "op": r.op,
                    "threshold": r.threshold,
                    "window_seconds": r.window,
                    "for_seconds": r.for_seconds,
                    "severity": r.severity,
                    "builtin": r.builtin,
                    "action": r.action,
                }
                for r in alerting.rules
            ],
            "notifiers": self.manager.active,
            "undelivered": alerting.state.pending(),
            "delivery": delivery,
        }

    def silences_view(self) -> list[dict[str, Any]]:
        now = time.time()
        return [
            s.to_json(now)
            for s in sorted(self._alerting().engine.silences.values(), key=lambda s: s.starts_at)
        ]

    def add_silence(self, body: object) -> dict[str, Any]:
        alerting, now = self._alerting(), time.time()
        silence = alerting.engine.add_silence(**parse_silence(body, now))
        alerting.state.save(alerting.engine)
        return silence.to_json(now)

    def expire_silence(self, silence_id: str) -> dict[str, Any] | None:
        alerting, now = self._alerting(), time.time()
        silence = alerting.engine.expire_silence(silence_id, now)
        if silence is None:
            return None
        alerting.state.save(alerting.engine)
        return silence.to_json(now)

    async def slowest_records(
        self, app: str | None, count: int, seconds: float | None
    ) -> list[dict[str, Any]]:
        """The ``count`` slowest stored requests (within the window), slowest first."""
        since = self.store.last_tick_ns - int(seconds * 1e9) if seconds is not None else 0
        found: list[tuple[int, dict[str, Any]]] = []
        for entry in list(self.store.live(app)):
            try:
                # A reader of its own: the tick may close the entry's meanwhile.
                snapshot = await asyncio.to_thread(read_segment, entry.path)
            except (SegmentError, OSError, ValueError):
                continue
            recent = [r for r in snapshot.records if r.wall_ns >= since]
            recent.sort(key=lambda r: r.duration_ns, reverse=True)
            found.extend((r.duration_ns, record_json(r, entry.app, entry.pid)) for r in recent[:count])
        found.sort(key=lambda item: item[0], reverse=True)
        return [row for _, row in found[:count]]
