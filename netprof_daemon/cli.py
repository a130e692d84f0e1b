"""``netprofd --config FILE [--listen HOST:PORT] [--check]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from netprof_core import ConfigError
from netprof_core._display import PrintableFormatter

from . import __version__
from .config import DaemonConfig, load_daemon_config
from .daemon import Daemon
from .directory import UnsafeSegmentDir
from .notification import Alert, Notification
from .plugins import NotifierManager
from .state import StateDirError, check_state_dir
from .store import StoreLocked

__all__ = ("main", "run")

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netprofd",
        description="Reads every profiled process on this host; serves the debug API and /metrics.",
    )
    parser.add_argument(
        "--config", metavar="FILE", default=os.environ.get("NETPROF_CONFIG"),
        help="TOML or JSON config (default: $NETPROF_CONFIG)",
    )  # fmt: skip
    parser.add_argument("--listen", metavar="HOST:PORT", help="overrides daemon.listen")
    parser.add_argument("--check", action="store_true", help="validate the config, print every error, exit")
    parser.add_argument(
        "--test-notify", action="store_true",
        help="send one test notification through every configured notifier, report each result, exit",
    )  # fmt: skip
    parser.add_argument(
        "--list-notifiers", action="store_true", help="list the installed notifier plugins, exit"
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--version", action="version", version=f"netprofd {__version__}")
    return parser


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # plain asyncio where uvloop is not installed
        return asyncio.new_event_loop
    return uvloop.new_event_loop  # type: ignore[no-any-return]


def _api_key(config: DaemonConfig) -> tuple[str | None, str | None]:
    """(key, None) or (None, why the daemon may not start). What is weak
    about the key (a file others may read, a short key) is logged."""
    try:
        key = config.read_api_key()
    except ConfigError as exc:
        return None, str(exc)
    for warning in key.warnings:
        logging.getLogger("netprofd").warning("%s", warning)
    if key.value is None and config.daemon.require_auth:
        return None, (
            f"{config.source}: no API key: set NETPROF_API_KEY or daemon.api_key_file "
            "(or, on a loopback address only, daemon.require_auth = false)"
        )
    return key.value, None


async def _serve_with_signals(daemon: Daemon) -> None:
    loop = asyncio.get_running_loop()
    handled: dict[signal.Signals, Callable[[], None]] = {
        signal.SIGTERM: daemon.request_stop,
        signal.SIGINT: daemon.request_stop,
        signal.SIGHUP: daemon.request_reload,
    }
    previous = {sig: signal.getsignal(sig) for sig in handled}
    for sig, handler in handled.items():
        loop.add_signal_handler(sig, handler)
    try:
        await daemon.serve()
    finally:
        for sig, before in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, before)


async def _test_notify(manager: NotifierManager, config: DaemonConfig) -> int:
    """The guide's "check notification system configuration": one test
    notification through every configured plugin, each result reported."""
    now = time.time()
    alert = Alert(
        name="NetprofTestNotification",
        state="firing",
        severity="info",
        labels={"alertname": "NetprofTestNotification", "severity": "info", "app": "netprofd"},
        value=None,
        threshold=0.0,
        summary=f"a test notification from netprofd on {socket.gethostname()}: if you read this, delivery works",
        starts_at=now,
    )
    notification = Notification(uuid.uuid4().hex, "firing", (alert,), now, test=True)
    timeout = config.daemon.notify_timeout_seconds
    names = manager.active
    results = await asyncio.gather(
        *(manager.deliver(name, notification, timeout) for name in names), return_exceptions=True
    )
    failed = 0
    for name, result in zip(names, results):
        if isinstance(result, BaseException):
            failed += 1
            print(f"{name}: FAILED: {result}")
        else:
            print(f"{name}: delivered")
    if not names:
        print("no notifier is configured (add a [notifiers.<name>] table)")
    return 1 if failed or not names else 0


def run(coro_factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(coro_factory())


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    # Names, paths and messages in a line are shown escaped: one record, one line, no control.
    handler.setFormatter(PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level, handlers=[handler])
    if not args.config:
        print("netprofd: no config: pass --config FILE or set NETPROF_CONFIG", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load_daemon_config(args.config, listen=args.listen)
    except ConfigError as exc:
        print(f"netprofd: {len(exc.problems)} error(s) in the configuration:", file=sys.stderr)
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    key, refusal = _api_key(config)
    if refusal:
        print(f"netprofd: {refusal}", file=sys.stderr)
        return EXIT_CONFIG
    manager = NotifierManager(config.notifiers)
    try:
        manager.load()
    except ConfigError as exc:
        print(f"netprofd: {len(exc.problems)} error(s) in the configuration:", file=sys.stderr)
        print("\n".join(f"{config.source}: {problem}" for problem in exc.problems), file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        try:  # as the daemon will find it (when --check runs as the daemon's user)
            check_state_dir(config.daemon.state_dir, create=False)
        except StateDirError as exc:
            print(f"netprofd: {config.source}: daemon.state_dir: {exc}", file=sys.stderr)
            manager.close()
            return EXIT_CONFIG
        try:  # resolved as the daemon will bind it
            config.listen_addresses()
        except ConfigError as exc:
            print(f"netprofd: {exc}", file=sys.stderr)
            manager.close()
            return EXIT_CONFIG
        auth = "bearer key" if key else "no auth (loopback only)"
        print(
            f"{args.config}: OK (listen {config.daemon.listen}, {auth}, segments in {config.profiling.segment_dir}, "
            f"{len(config.all_rules())} rules, notifiers: {', '.join(manager.active) or 'none'})"
        )
        manager.close()
        return 0
    if args.list_notifiers:
        for name, description in manager.describe().items():
            mark = "active" if name in manager.active else "      "
            print(f"{name:14} {mark}  {description}")
        manager.close()
        return 0
    if args.test_notify:
        try:
            return asyncio.run(_test_notify(manager, config))
        finally:
            manager.close()
    daemon = Daemon(config, manager, api_key=key)
    try:
        run(lambda: _serve_with_signals(daemon))
    except UnsafeSegmentDir as exc:  # the deployment must change: as a config error
        print(f"netprofd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StateDirError as exc:  # the deployment must change: as a config error
        print(f"netprofd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ConfigError as exc:  # daemon.listen, resolved at the start, refused
        print(f"netprofd: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StoreLocked as exc:
        print(f"netprofd: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as exc:
        print(f"netprofd: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return 0
