"""``python -m tests.apps.serve_wsgi MODULE:ATTR PORT``: serve a WSGI app with
wsgiref on 127.0.0.1, in a background thread; SIGTERM stops it cleanly (so
netprof's atexit hook marks the segment closed)."""

from __future__ import annotations

import importlib
import signal
import sys
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # no access log
        pass


def main(target: str, port: int) -> None:
    module_name, _, attr = target.partition(":")
    app = getattr(importlib.import_module(module_name), attr or "application")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    server = make_server("127.0.0.1", port, app, handler_class=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    while not stop.wait(0.2):
        pass
    server.shutdown()  # lets the request in progress finish
    thread.join(10)
    server.server_close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
