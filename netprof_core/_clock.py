"""The hooks' clock: ``now_ns()`` is ``time.monotonic_ns()``, the clock the
recorder core and the reader share.

The hooks' sources import it from here; compiled, they call the inline C
function of the same name in ``_clock.pxd`` instead (the same clock read
through ``clock_gettime``), which costs no Python call and makes no int.
"""

from time import monotonic_ns as now_ns

__all__ = ("now_ns",)
