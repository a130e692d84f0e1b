"""instrument()'s state, shared by ``netprof_core.clients`` and both twins of
the outbound hooks' per-request code (``_outbound_py`` and ``_outbound_c``)."""

from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._outbound_py import OutboundHook

# Called once a request is over: (request, response or None, exception or None, start_ns).
Done = Callable[[Any, Any, "BaseException | None", int], None]

# instrument()'s hook, read by the patched methods on every call; None when not instrumented.
active: OutboundHook | None = None
# Set while a hook times a request when instrument() is active too, so that its
# patch of a transport or adapter beneath an instrumented client does not record
# the request a second time.
timing: contextvars.ContextVar[bool] = contextvars.ContextVar("netprof_timing", default=False)


def timed(done: Done, request: Any, send: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``send(*args, **kwargs)``; then ``done`` records ``request``, whatever happened."""
    start_ns = time.monotonic_ns()
    # Only instrument()'s patches look at timing; without them, spare the cost.
    token = timing.set(True) if active is not None else None
    try:
        response = send(*args, **kwargs)
    except BaseException as exc:
        done(request, None, exc, start_ns)
        raise
    finally:
        if token is not None:
            timing.reset(token)
    done(request, response, None, start_ns)
    return response


async def timed_async(done: Done, request: Any, send: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    start_ns = time.monotonic_ns()
    token = timing.set(True) if active is not None else None
    try:
        response = await send(*args)
    except BaseException as exc:
        done(request, None, exc, start_ns)
        raise
    finally:
        if token is not None:
            timing.reset(token)
    done(request, response, None, start_ns)
    return response
