"""Writing the control blocks: what the API's control calls, a config reload
and auto-disable do to the segments of the profiled processes.

The daemon also remembers what it last set, per application, and applies it to
processes that appear later (a restarted worker must not come back enabled
after an emergency disable).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from netprof_core import ProfilingConfig, SegmentControl

from .log import control_logger
from .store import ProcessEntry

__all__ = ("ActionResult", "ControlMemory", "push_settings")

Action = Callable[[SegmentControl], None]


@dataclass(slots=True)
class ActionResult:
    segments: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"segments": self.segments, "failed": self.failed}


def apply(entries: Iterable[ProcessEntry], action: Action, what: str) -> ActionResult:
    result = ActionResult()
    for entry in entries:
        control = entry.reader.control
        if control is None:
            reason = "mapped read-only: netprofd may not write this segment"
            result.failed.append({"path": entry.path, "reason": reason})
            control_logger.warning("%s: cannot %s: %s", entry.path, what, reason)
            continue
        try:
            action(control)
        except (ValueError, OSError) as exc:
            result.failed.append({"path": entry.path, "reason": str(exc)})
            control_logger.warning("%s: cannot %s: %s", entry.path, what, exc)
        else:
            result.segments += 1
    if result.segments:
        control_logger.info("%s: %d segment(s)", what, result.segments)
    return result


def push_settings(control: SegmentControl, config: ProfilingConfig) -> None:
    """The run-time settings a config holds, into one segment (on SIGHUP).
    The daemon's file is the host's one configuration: its settings replace
    what each app started with, as the guide's rollback expects."""
    control.set_feature_flag(config.feature_flag_enabled)
    if config.enabled:
        control.enable(lift_auto_disable=False)  # only /enable and reset-errors lift it
    else:
        control.disable()
    control.set_sample_rate(config.sample_rate)
    control.set_slow_request_threshold(config.slow_request_threshold)
    control.set_log_slow_requests(config.log_slow_requests)
    control.set_performance_monitoring(config.performance_monitoring)
    control.set_retention(config.retention_hours * 3600)
    control.set_ring_capacity(min(config.max_stored_requests, control.header.ring_capacity))


class ControlMemory:
    """What was last written, so that a process discovered later gets it too."""

    def __init__(self) -> None:
        self.config: ProfilingConfig | None = None  # pushed by a reload
        self.enabled: dict[str | None, bool] = {}  # by app; None: every app
        self.retention_seconds: float | None = None
        self.auto_disabled: set[str] = set()  # apps a disable rule stopped, until /enable or reset-errors
        # Whether a process's identity was verified (store.identity.verified): an
        # auto-disable reaches no other. None: every process found counts as verified.
        self.verified: Callable[[ProcessEntry], bool] | None = None

    def remember_enabled(self, app: str | None, on: bool) -> None:
        if app is None:
            self.enabled.clear()
        self.enabled[app] = on
        if on:
            self.lift_auto_disable(app)

    def lift_auto_disable(self, app: str | None) -> None:
        if app is None:
            self.auto_disabled.clear()
        else:
            self.auto_disabled.discard(app)

    def catch_up(self, entry: ProcessEntry) -> None:
        """Apply to a newly found process what the other processes were given."""
        actions: list[tuple[Action, str]] = []
        if self.config is not None:
            config = self.config
            actions.append((lambda c: push_settings(c, config), "apply the reloaded config"))
        on = self.enabled.get(entry.app, self.enabled.get(None))
        if on is not None:
            actions.append(
                (SegmentControl.enable if on else SegmentControl.disable, "enable" if on else "disable")
            )
        if entry.app in self.auto_disabled and (self.verified is None or self.verified(entry)):
            actions.append((SegmentControl.auto_disable, "auto-disable"))
        if self.retention_seconds is not None:
            seconds = self.retention_seconds
            actions.append((lambda c: c.set_retention(seconds), "set retention"))
        for action, what in actions:
            apply([entry], action, f"{what} (new process {entry.pid})")
