"""netprof_core: always-on network profiling for Python services.

A process records each request it serves or sends into its own shared-memory
segment; netprofd (or ``netprof stats``) reads the segments of every process.
"""

from ._layout import Direction, ErrorKind
from ._recorder import IMPLEMENTATION
from .config import ConfigError, ProfilingConfig, load_profiling_config
from .control import ControlState, SegmentControl
from .histogram import Histogram
from .hooks import get_recorder
from .reader import (
    RequestRecord,
    RouteKey,
    RouteStats,
    SegmentBusy,
    SegmentReader,
    SegmentSnapshot,
    merge_routes,
    read_segment,
    read_segments,
)
from .recorder import Measurement, Recorder
from .segment import SegmentError

__version__ = "0.1.0"

__all__ = (
    "IMPLEMENTATION",
    "ConfigError",
    "ControlState",
    "Direction",
    "ErrorKind",
    "Histogram",
    "Measurement",
    "ProfilingConfig",
    "Recorder",
    "RequestRecord",
    "RouteKey",
    "RouteStats",
    "SegmentBusy",
    "SegmentControl",
    "SegmentError",
    "SegmentReader",
    "SegmentSnapshot",
    "__version__",
    "get_recorder",
    "load_profiling_config",
    "merge_routes",
    "read_segment",
    "read_segments",
)
