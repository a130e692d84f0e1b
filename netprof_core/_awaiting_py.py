"""``awaiting``: an awaitable that awaits another and then reports how it
ended. The pure-Python twin of ``_awaiting_c.pyx``: here simply the
``async def`` wrapper that the C twin stands in for."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .log import logger

# (context, result or None, exception or None, start_ns)
OnEnd = Callable[[Any, Any, "BaseException | None", Any], None]


async def awaiting(awaitable: Awaitable[Any], on_end: OnEnd, context: Any, start_ns: Any) -> Any:
    """``awaitable``'s result; once ``awaitable`` has returned or raised,
    calls ``on_end(context, result, None, start_ns)`` or ``on_end(context,
    None, exception, start_ns)``, once. The exception goes on unchanged; one
    raised by ``on_end`` is the hook's bug, logged, and never reaches the
    awaiting code."""
    try:
        result = await awaitable
    except BaseException as exc:
        _report(on_end, context, None, exc, start_ns)
        raise
    _report(on_end, context, result, None, start_ns)
    return result


def _report(on_end: OnEnd, context: Any, result: Any, exc: BaseException | None, start_ns: Any) -> None:
    try:
        on_end(context, result, exc, start_ns)
    except Exception:  # noqa: BLE001 - netprof's own error must not reach the application
        logger.error("netprof: an await's end could not be recorded", exc_info=True)
