"""``awaiting``: an awaitable that awaits another and then reports how it
ended. The pure-Python twin of ``_awaiting_c.pyx``: here simply the
``async def`` wrapper that the C twin stands in for."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

# (context, result or None, exception or None, start_ns)
OnEnd = Callable[[Any, Any, "BaseException | None", Any], None]


async def awaiting(awaitable: Awaitable[Any], on_end: OnEnd, context: Any, start_ns: Any) -> Any:
    """``awaitable``'s result; once ``awaitable`` has returned or raised,
    calls ``on_end(context, result, None, start_ns)`` or ``on_end(context,
    None, exception, start_ns)``, once. The exception goes on unchanged."""
    try:
        result = await awaitable
    except BaseException as exc:
        on_end(context, None, exc, start_ns)
        raise
    on_end(context, result, None, start_ns)
    return result
