"""The control block: run-time settings a recorder obeys, written by the
process itself, by netprofd or by the CLI."""

from __future__ import annotations

import itertools
import mmap
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import _layout as L
from .config import ProfilingConfig
from .segment import SegmentHeader, map_segment

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ("ControlState", "SegmentControl", "initial_control", "read_control_words")

_U64 = L.U64
MAX_RETENTION_SECONDS = 100_000 * 3600.0  # as the config's retention_hours
_CONTROL = struct.Struct(f"<{L.CONTROL_WORDS}Q")


@dataclass(frozen=True, slots=True)
class ControlState:
    enabled: bool
    feature_flag_enabled: bool
    auto_disabled: bool
    log_slow_requests: bool
    performance_monitoring: bool
    auto_disable_on_error: bool
    graceful_degradation: bool
    sample_rate: float
    slow_request_threshold: float  # seconds
    ring_capacity: int
    retention_seconds: float  # 0: no age limit
    clean_floor: int

    @property
    def recording(self) -> bool:
        """Whether requests are being recorded (before sampling)."""
        return self.enabled and self.feature_flag_enabled and not self.auto_disabled

    @classmethod
    def from_buffer(cls, buf: object) -> ControlState:
        return cls.from_words(read_control_words(buf))

    @classmethod
    def from_words(cls, w: tuple[int, ...]) -> ControlState:
        return cls(
            enabled=bool(w[L.C_ENABLED]),
            feature_flag_enabled=bool(w[L.C_FEATURE_FLAG]),
            auto_disabled=bool(w[L.C_AUTO_DISABLED]),
            log_slow_requests=bool(w[L.C_LOG_SLOW]),
            performance_monitoring=bool(w[L.C_PERF_MONITORING]),
            auto_disable_on_error=bool(w[L.C_AUTO_DISABLE_ON_ERROR]),
            graceful_degradation=bool(w[L.C_GRACEFUL]),
            sample_rate=min(w[L.C_SAMPLE_THRESHOLD], L.SAMPLE_ALL) / L.SAMPLE_ALL,
            slow_request_threshold=w[L.C_SLOW_NS] / 1e9,
            ring_capacity=w[L.C_RING_CAPACITY],
            retention_seconds=w[L.C_RETENTION_NS] / 1e9,
            clean_floor=w[L.C_CLEAN_FLOOR],
        )


def read_control_words(buf: object) -> tuple[int, ...]:
    return _CONTROL.unpack_from(buf, L.CONTROL_OFFSET)  # type: ignore[arg-type, no-any-return]


# A request word holds a token unique to its writer (pid and a count), never
# a read-modify-write of the previous value: two readers asking at once cannot
# write a value the writer has already answered.
_request_counter = itertools.count(1)


def _request_token() -> int:
    return (os.getpid() << 32) | (next(_request_counter) & 0xFFFFFFFF)


def _sample_threshold(rate: float) -> int:
    return L.SAMPLE_ALL if rate >= 1.0 else round(rate * L.SAMPLE_ALL)


def initial_control(config: ProfilingConfig, ring_capacity: int) -> dict[int, int]:
    """The control words of a new segment, from the configuration."""
    return {
        L.C_ENABLED: int(config.enabled),
        L.C_FEATURE_FLAG: int(config.feature_flag_enabled),
        L.C_LOG_SLOW: int(config.log_slow_requests),
        L.C_PERF_MONITORING: int(config.performance_monitoring),
        L.C_AUTO_DISABLE_ON_ERROR: int(config.auto_disable_on_error),
        L.C_GRACEFUL: int(config.graceful_degradation),
        L.C_SAMPLE_THRESHOLD: _sample_threshold(config.sample_rate),
        L.C_SLOW_NS: round(config.slow_request_threshold * 1e9),
        L.C_RING_CAPACITY: ring_capacity,
        L.C_RETENTION_NS: round(config.retention_hours * 3600e9),
    }


class SegmentControl:
    """Writes one segment's control block; the recorder picks each setting up
    on its next request. Each word is written with one aligned 8-byte store
    (``struct`` packs a native "<Q" with a single store on little-endian hosts)."""

    def __init__(self, buf: mmap.mmap, header: SegmentHeader) -> None:
        self._buf = buf
        self.header = header

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SegmentControl:
        buf, header = map_segment(path, writable=True)
        return cls(buf, header)

    def close(self) -> None:
        self._buf.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _set(self, word: int, value: int) -> None:
        _U64.pack_into(self._buf, L.CONTROL_OFFSET + word * L.WORD, value)

    def state(self) -> ControlState:
        return ControlState.from_buffer(self._buf)

    def enable(self, *, lift_auto_disable: bool = True) -> None:
        """Turn recording on; this also lifts an auto-disable unless told not to."""
        if lift_auto_disable:
            self.reset_errors()
        self._set(L.C_ENABLED, 1)

    def disable(self) -> None:
        self._set(L.C_ENABLED, 0)

    def auto_disable(self) -> None:
        """Stop recording as an auto-disable does (what netprofd's disable
        rules use); ``enable()`` or ``reset_errors()`` lifts it."""
        self._set(L.C_AUTO_DISABLED, 1)

    def _set_flag(self, word: int, name: str, on: bool) -> None:
        if not isinstance(on, bool):
            # ValueError, as for every other bad setting here (a public API: kept as it is).
            raise ValueError(f"{name} must be true or false, got {on!r}")  # noqa: TRY004
        self._set(word, int(on))

    def set_feature_flag(self, on: bool) -> None:
        self._set_flag(L.C_FEATURE_FLAG, "feature_flag_enabled", on)

    def set_log_slow_requests(self, on: bool) -> None:
        self._set_flag(L.C_LOG_SLOW, "log_slow_requests", on)

    def set_performance_monitoring(self, on: bool) -> None:
        self._set_flag(L.C_PERF_MONITORING, "performance_monitoring", on)

    def set_sample_rate(self, rate: float) -> None:
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"sample_rate must be a number from 0 to 1, got {rate!r}")
        self._set(L.C_SAMPLE_THRESHOLD, _sample_threshold(rate))

    def set_slow_request_threshold(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds <= 3600:
            raise ValueError(f"slow_request_threshold must be more than 0 and at most 3600 seconds, got {seconds!r}")
        self._set(L.C_SLOW_NS, round(seconds * 1e9))

    def set_retention(self, max_age_seconds: float) -> None:
        """Serve no record older than this (0: no limit)."""
        if (
            isinstance(max_age_seconds, bool)
            or not isinstance(max_age_seconds, (int, float))
            or not 0 <= max_age_seconds <= MAX_RETENTION_SECONDS
        ):
            raise ValueError(
                f"retention must be a number of seconds from 0 to {MAX_RETENTION_SECONDS:.0f}, got {max_age_seconds!r}"
            )
        self._set(L.C_RETENTION_NS, round(max_age_seconds * 1e9))

    def set_ring_capacity(self, capacity: int) -> None:
        """Keep at most ``capacity`` records, up to the size the segment was made with."""
        limit = self.header.ring_capacity
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= limit:
            raise ValueError(f"ring capacity must be an integer from 1 to {limit} (this segment's size), got {capacity!r}")
        self._set(L.C_RING_CAPACITY, capacity)

    def cleanup(self) -> None:
        """Drop the stored records; counters and histograms stay."""
        (next_index,) = _U64.unpack_from(self._buf, self.header.layout.live_offset + L.G_NEXT_INDEX * L.WORD)
        self._set(L.C_CLEAN_FLOOR, next_index)

    def reset_errors(self) -> None:
        """Clear the auto-disabled state now, and the consecutive-error count
        when the recorder next counts an error."""
        self._set(L.C_RESET_ERRORS_REQUEST, _request_token())
        self._set(L.C_AUTO_DISABLED, 0)

    def request_publish(self) -> None:
        """Ask the writer to copy its statistics to the published area."""
        self._set(L.C_PUBLISH_REQUEST, _request_token())
