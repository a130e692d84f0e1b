"""netprofd: reads the segments of every profiled process on the host, serves
the debug API and Prometheus /metrics."""

import pluggy

__version__ = "0.1.0"

# Notifier plugins mark their hook functions with this (see hookspecs.py).
hookimpl = pluggy.HookimplMarker("netprof")

__all__ = ("__version__", "hookimpl")
