"""netprofd: reads the segments of every profiled process on the host, serves
the debug API and Prometheus /metrics."""

__version__ = "0.1.0"

__all__ = ("__version__",)
