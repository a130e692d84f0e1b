"""netprofd's lifecycle: ``serve()`` = ``startup()``, the main loop, ``shutdown()``.

One obvious main loop: every tick, snapshot every segment, keep a checkpoint
for the windows, ping the watchdog. The HTTP API reads what the last tick left
and writes control blocks; it never waits for the loop. Signal handlers are
installed by the CLI only; the daemon offers ``request_stop()`` and
``request_reload()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import os
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from netprof_core import ConfigError, SegmentControl, SegmentError

from . import actions
from .actions import ActionResult, ControlMemory
from .alerting import Alerting
from .api import make_app
from .config import DaemonConfig, load_daemon_config
from .log import daemon_logger
from .metrics import NetprofCollector
from .plugins import NotifierManager
from .procstat import ProcessUsage, read_rss_bytes
from .server import Listener
from .silences import parse_silence
from .state import AlertStateStore, check_state_dir
from .store import AppState, SegmentStore, stored_records
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
        self.memory.verified = self.store.identity.verified
        self.history = WindowHistory()
        self.usage = ProcessUsage()
        self.apps: dict[str, AppState] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NetprofCollector(self))
        self.started = time.monotonic()
        self.bound: list[tuple[str, int]] = []
        self._stop = asyncio.Event()
        self._reload_wanted = False
        self.listener: Listener | None = None  # the HTTP API, once started
        self._last_tick_mono: float | None = None
        self.tick_failures = 0  # ticks that failed, or could not read what they must
        self.consecutive_tick_failures = 0
        self.tick_problem: str | None = None  # why the last tick failed
        self._last_watchdog = 0.0
        self._dispatching: asyncio.Task[None] | None = None
        self._state: AlertStateStore | None = None

    # -- lifecycle ------------------------------------------------------------

    async def serve(self) -> None:
        """Listen first, then read: a first tick that takes long (or fails)
        never keeps /healthz from answering, nor the daemon from starting."""
        first_tick: asyncio.Future[None] | None = None
        try:
            await self.startup()
            first_tick = self._start_first_tick()
            await self._await_first_tick(first_tick)
            if self._stop.is_set():
                return
            self._start_alerting()
            notify("READY=1", self._status())  # fully up: `systemctl start` returns now
            await self.main_loop()
        finally:
            if first_tick is not None and not first_tick.done():  # a stop during it: give it a moment
                await asyncio.wait({first_tick}, timeout=2.0)
            await self.shutdown()

    async def startup(self) -> None:
        """Take the segment directory, check the state directory, listen. The
        API answers 503 "starting" (and /healthz that no tick ran) until the
        first tick is done and the alert state restored; then READY=1 (serve())."""
        self.store.lock()
        check_state_dir(self.config.daemon.state_dir)  # unusable: refused before anything listens
        settings = self.config.daemon
        self.listener = Listener(
            make_app(self, self.api_key),
            self.config.listen_addresses(),  # bound as they were checked (loopback where no key)
            max_connections=settings.max_connections,
            idle_timeout=settings.idle_timeout_seconds,
        )
        self.bound = await self.listener.start()
        daemon_logger.info(
            "netprofd listening on %s (at most %d connections), reading %s",
            ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.bound),
            self.listener.max_connections,
            self.store.segment_dir,
        )
        if self.listener.max_connections < settings.max_connections:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            daemon_logger.warning(
                "daemon.max_connections = %d lowered to %d, a quarter of the descriptor limit %d "
                "(LimitNOFILE= in the systemd unit; see docs/DEPLOYMENT.md)",
                settings.max_connections, self.listener.max_connections, soft,
            )  # fmt: skip

    def _start_first_tick(self) -> asyncio.Future[None]:
        """The first tick reads every segment found, and folds every ended
        process: it may take long. It runs in a thread of its own while the
        loop answers /healthz; nothing else touches the store meanwhile (the
        API says "starting"; alerting, with its sqlite connection, starts after)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def run() -> None:
            try:
                self.tick()
            except BaseException as exc:  # noqa: BLE001  (told by /healthz; the loop's ticks go on)
                daemon_logger.exception("the first tick failed")
                self._tick_done(f"the first tick failed: {exc!r}")
            finally:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(finished)

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        threading.Thread(target=run, name="netprofd-first-tick", daemon=True).start()
        return done

    async def _await_first_tick(self, done: asyncio.Future[None]) -> None:
        """Until the first tick ends, or a stop. (Before READY=1: systemd's
        start timeout, not its watchdog, bounds a first tick that never ends.)"""
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        started = time.monotonic()
        try:
            await asyncio.wait([done, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if done.done():
            daemon_logger.info(
                "first reading done in %.1f s: %d processes",
                time.monotonic() - started,
                len(self.store.entries),
            )

    def _start_alerting(self) -> None:
        """Restore the alert state and start delivering (on the loop's thread,
        where the state's sqlite connection lives)."""
        self._state = AlertStateStore(self.config.daemon.state_dir)
        self.alerting = Alerting(self.config, self.manager, self._state, self.memory)
        self._dispatching = asyncio.create_task(self.alerting.dispatcher.run(self._stop))

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
        if self.listener is not None:
            await self.listener.stop()
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
        """One tick; a failure in it is counted, logged once while it lasts,
        and told by /healthz (503) after a few in a row (api.TICK_FAILURES_UNHEALTHY)."""
        problem = self._refresh_store()
        try:
            self.apps = self.store.apps()
            self.history.add(self.store.last_tick_ns, self.apps)
            self.usage.sample({entry.pid for entry in self.store.live()})
        except Exception as exc:  # noqa: BLE001  (the next tick tries again; /healthz tells)
            problem = problem or f"the tick failed: {exc!r}"
            if not self.consecutive_tick_failures:
                daemon_logger.exception("the tick failed")
        if self.alerting is not None:
            try:
                self.alerting.tick(self.apps, self.history, self.store, self.store.last_tick_ns)
            except Exception as exc:  # noqa: BLE001  (a bug in alerting must not stop the snapshots)
                problem = problem or f"alert evaluation failed: {exc!r}"
                if not self.consecutive_tick_failures:
                    daemon_logger.exception("alert evaluation failed; snapshots go on")
        self._tick_done(problem)
        self._last_tick_mono = time.monotonic()

    def _tick_done(self, problem: str | None) -> None:
        if problem is None:
            if self.consecutive_tick_failures:
                daemon_logger.info("ticks succeed again after %d failed", self.consecutive_tick_failures)
            self.consecutive_tick_failures = 0
            self.tick_problem = None
            return
        self.tick_failures += 1
        self.consecutive_tick_failures += 1
        self.tick_problem = problem

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

    def _refresh_store(self) -> str | None:
        """Snapshot every segment; why the tick's reading was incomplete, or None."""
        try:
            self.store.refresh()
        except Exception as exc:  # noqa: BLE001  (a bug of ours must not end the daemon)
            if not self.consecutive_tick_failures:
                daemon_logger.exception("reading the segments failed; the last snapshots stand")
            return f"reading the segments failed: {exc!r}"
        return self.store.problem  # (logged by the store, once while it lasts)

    # -- views, for the API ---------------------------------------------------------

    def overhead_by_app(self, seconds: float = 60.0) -> dict[str, float]:
        """Mean ns per timed record() over the last ``seconds``, per app (since
        start when nothing was timed in the window)."""
        windows = self.history.window(self.apps, self.store.last_tick_ns, seconds, routes=False)
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
        """SilenceError (a 400 naming the field) for a bad or one too many."""
        alerting, now = self._alerting(), time.time()
        engine = alerting.engine
        silence = engine.add_silence(**parse_silence(body, now), now=now)
        try:  # one row: the cost does not grow with the silences kept
            alerting.state.put_silence(silence, forgotten=engine.prune(now))
        except Exception:
            del engine.silences[silence.id]  # not durable: not kept either
            raise
        return silence.to_json(now)

    def expire_silence(self, silence_id: str) -> dict[str, Any] | None:
        alerting, now = self._alerting(), time.time()
        before = alerting.engine.silences.get(silence_id)
        silence = alerting.engine.expire_silence(silence_id, now)
        if silence is None:
            return None
        if silence is not before and before is not None:
            try:
                alerting.state.put_silence(silence)
            except Exception:
                alerting.engine.silences[silence_id] = before
                raise
        return silence.to_json(now)

    async def slowest_records(
        self, app: str | None, count: int, seconds: float | None
    ) -> list[dict[str, Any]]:
        """The ``count`` slowest stored requests (within the window), slowest first."""
        since = self.store.last_tick_ns - int(seconds * 1e9) if seconds is not None else 0
        found: list[tuple[int, dict[str, Any]]] = []
        for entry in list(self.store.live(app)):
            try:
                # A chunk of the ring at a time, in a worker thread (bounded time
                # and memory per step), the ``count`` slowest kept.
                async with contextlib.aclosing(stored_records(entry.path)) as chunks:
                    async for chunk in chunks:
                        recent = (r for r in chunk if r.wall_ns >= since)
                        found.extend(
                            (r.duration_ns, record_json(r, entry.app, entry.pid))
                            for r in heapq.nlargest(count, recent, key=lambda r: r.duration_ns)
                        )
                        found = heapq.nlargest(count, found, key=lambda item: item[0])
            except (SegmentError, OSError, ValueError):
                continue
        found.sort(key=lambda item: item[0], reverse=True)
        return [row for _, row in found[:count]]
