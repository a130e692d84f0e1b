"""Finds, configures and calls the notifier plugins.

Plugins come only from the ``netprof.notifiers`` entry points (the built-in ones
too) or from ``register()``; nothing is loaded at import time. Each plugin is
called on its own (``deliver``): pluggy stops a hook call at the first raising
implementation and has no async hooks, so the manager calls one implementation
at a time, in a worker thread, and awaits what it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import pluggy

from netprof_core.config import ConfigError

from . import hookspecs
from .notification import Notification

__all__ = ("DISABLED_ENV", "ENTRY_POINT_GROUP", "DeliveryError", "NotifierManager")

ENTRY_POINT_GROUP = "netprof.notifiers"
DISABLED_ENV = "NETPROF_DISABLED_PLUGINS"
DEFAULT_ACTIVE = ("log",)  # when the configuration has no ``notifiers`` table at all

logger = logging.getLogger("netprofd.plugins")

# "urls[1]: not a valid URL" names a key; anything else is about the whole table.
_NAMES_A_KEY = re.compile(r"^[A-Za-z_][\w.\[\]-]*: ")


class DeliveryError(Exception):
    """A plugin did not deliver a notification: it raised, or it took too long."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(name, reason)
        self.name = name
        self.reason = reason

    def __str__(self) -> str:
        return f"notifier {self.name!r}: {self.reason}"


def _in_daemon_thread(
    loop: asyncio.AbstractEventLoop, call: Callable[[], Any], name: str
) -> asyncio.Future[Any]:
    """Run ``call`` in a thread of its own, a daemon thread: a plugin that hangs
    holds that thread, never the event loop, and never the daemon's exit (a
    thread pool's workers are joined at exit)."""
    future: asyncio.Future[Any] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():  # the caller may have timed out and cancelled it
            outcome()

    def run() -> None:
        outcome: Callable[[], None]
        try:
            outcome = functools.partial(future.set_result, call())
        except BaseException as error:  # noqa: BLE001  (handed to the awaiting coroutine)
            outcome = functools.partial(future.set_exception, error)
        with contextlib.suppress(RuntimeError):  # the loop closed while the plugin hung
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name=f"netprof-notify-{name}", daemon=True).start()
    return future


class NotifierManager:
    """The notifier plugins of one daemon and their configuration.

    ``notifiers`` is the configuration's ``notifiers`` table (plugin name → its
    table), or ``None`` when the configuration has none. Call ``load()`` once,
    then ``deliver()`` for each active plugin; ``close()`` at shutdown.
    """

    def __init__(self, notifiers: Mapping[str, Mapping[str, Any]] | None) -> None:
        self._tables = notifiers
        self.pm = pluggy.PluginManager("netprof")
        self.active: list[str] = []

    def register(self, plugin: object, name: str) -> None:
        """Add a plugin that is not installed (tests, inline plugins); before ``load()``."""
        self.pm.register(plugin, name=name)

    def load(self) -> None:
        """Find the installed plugins and configure the active ones.

        Raises ``ConfigError`` listing every problem: a table for a plugin that
        is not installed (or is disabled), and every table a plugin refused.
        """
        self.pm.add_hookspecs(hookspecs)
        for name in os.environ.get(DISABLED_ENV, "").split(","):
            if name.strip():
                self.pm.set_blocked(name.strip())
        self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        self.pm.check_pending()
        self.configure(self._tables)

    def configure(self, notifiers: Mapping[str, Mapping[str, Any]] | None) -> None:
        """(Re)configure from a ``notifiers`` table: at ``load()`` and on reload.

        On error ``active`` stays as it was (a plugin whose own table was
        accepted may already use it: pluggy has no separate "validate" step).
        """
        if notifiers is None:
            # The default is no request: a disabled default plugin is just left out.
            tables: dict[str, Any] = {name: {} for name in DEFAULT_ACTIVE if self.pm.get_plugin(name)}
        else:
            tables = dict(notifiers)
        problems: list[str] = []
        for name, table in tables.items():
            if self.pm.get_plugin(name) is None:
                blocked = self.pm.is_blocked(name)
                why = f"disabled by {DISABLED_ENV}" if blocked else "no such plugin installed"
                installed = ", ".join(self._installed()) or "none"
                problems.append(f"notifiers.{name}: {why} (installed: {installed})")
                continue
            if not isinstance(table, Mapping):
                problems.append(f"notifiers.{name}: must be a table, not {type(table).__name__}")
                continue
            impl = self._impl("netprof_configure", name)
            if impl is None:
                continue
            try:
                impl(table=table)
            except ValueError as error:
                message = str(error)
                sep = "." if _NAMES_A_KEY.match(message) else ": "
                problems.append(f"notifiers.{name}{sep}{message}")
            except Exception as error:  # noqa: BLE001  (a plugin's bug refuses its table, nothing more)
                problems.append(
                    f"notifiers.{name}: the plugin failed to read its table: {type(error).__name__}: {error}"
                )
        if problems:
            raise ConfigError(problems)
        self._tables = notifiers
        self.active = list(tables)
        logger.info("notifiers active: %s", ", ".join(self.active) or "none")

    def describe(self) -> dict[str, str]:
        """Every installed plugin's one-line description, by plugin name."""
        descriptions = {}
        for name in self._installed():
            impl = self._impl("netprof_describe", name)
            descriptions[name] = str(impl()) if impl is not None else ""
        return descriptions

    async def deliver(self, name: str, notification: Notification, timeout: float) -> None:
        """Have plugin ``name`` deliver ``notification`` within ``timeout`` seconds.

        Raises ``DeliveryError`` when the plugin raised, its awaitable raised, or
        the whole took longer than ``timeout``. A sync call that hangs keeps its
        worker thread; the event loop is never blocked.
        """
        impl = self._impl("netprof_notify", name)
        if impl is None:
            raise DeliveryError(name, "no such plugin, or it has no netprof_notify")
        loop = asyncio.get_running_loop()

        async def call() -> None:
            result = await _in_daemon_thread(loop, lambda: impl(notification=notification), name)
            if inspect.isawaitable(result):
                await result

        try:
            await asyncio.wait_for(call(), timeout)
        except asyncio.TimeoutError:
            raise DeliveryError(name, f"no answer within {timeout:g} s") from None
        except Exception as error:  # a plugin may raise anything; to the caller it is "not delivered"
            raise DeliveryError(name, f"{type(error).__name__}: {error}") from error

    def close(self) -> None:
        """Nothing to wait for: a hung plugin's thread is a daemon thread, and
        does not keep netprofd from exiting."""

    def _installed(self) -> list[str]:
        # Blocked names stay in pluggy's registry with a None plugin.
        return sorted(name for name, plugin in self.pm.list_name_plugin() if plugin is not None)

    def _impl(self, hook: str, name: str) -> Any:
        """Plugin ``name``'s implementation of ``hook``, called with keyword arguments."""
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if impl.plugin_name == name:
                # pluggy lets an implementation take fewer arguments than the spec.
                return lambda **kwargs: impl.function(*(kwargs[arg] for arg in impl.argnames))
        return None
