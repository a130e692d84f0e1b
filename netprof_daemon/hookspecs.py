"""The hooks a notifier plugin implements (pluggy project ``netprof``).

A plugin is a module or object with functions marked ``@netprof_daemon.hookimpl``
whose names are the hooks below; it is found through the ``netprof.notifiers``
entry-point group, under the entry point's name. docs/NOTIFIER_PLUGINS.md shows
how to write one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

import pluggy

from .notification import Notification

_F = TypeVar("_F", bound=Callable[..., Any])
_spec_marker = pluggy.HookspecMarker("netprof")


def _spec(func: _F) -> _F:
    # pluggy's marker is untyped; this keeps the hook signatures visible to type checkers.
    return cast(_F, _spec_marker(func))


@_spec
def netprof_notify(notification: Notification) -> Awaitable[None] | None:
    """Deliver one notification (one or more alerts of the same state).

    Called by the daemon for every notification due for this plugin, each plugin
    on its own and with a timeout. The call itself runs in a worker thread, so a
    blocking client is fine; an ``async def`` implementation (or any returned
    awaitable) is awaited on the daemon's event loop.

    Delivery is at least once, not exactly once: a daemon stopped (or killed)
    after the receiver took a notification but before the call returned sends
    it again when it restarts. ``notification.id`` is stable: the same on every
    retry and after a restart, so put it in the payload (the built-ins do: a
    field, an annotation, or the ``body``'s last line) for the receiver to
    deduplicate by.

    :param notification: what to send; ``title`` and ``body`` are ready-made
        text (``body`` ends with the id line, ``notification.id_line``).
    :return: ``None``, or an awaitable the daemon awaits.
    Raising (or the awaitable raising, or the timeout) means "not delivered":
    the daemon retries the same notification (same ``id``) later.
    """


@_spec
def netprof_configure(table: Mapping[str, Any]) -> None:
    """Take the plugin's own configuration table, ``notifiers.<plugin name>``.

    Called once when the daemon starts and again on every reload, before any
    ``netprof_notify``; a plugin without a table in the configuration is not
    active and is not called.

    :param table: the plugin's table (possibly empty), read-only.
    :return: nothing. Raise ``ValueError`` whose message starts with the bad key
        (e.g. ``"url: must start with http:// or https://"``) to refuse the
        table; the daemon reports it as ``notifiers.<name>.<key>: ...``.
    """


@_spec
def netprof_describe() -> str:  # type: ignore[empty-body]
    """Describe the plugin in one line, for ``netprofd`` listings.

    Called whenever the daemon lists its plugins, active or not.

    :return: one line of text, e.g. ``"Sends alerts to Alertmanager's v2 API"``.
    """
