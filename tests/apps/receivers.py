"""Notification receivers for tests where netprofd runs in another process:
an HTTP endpoint (apprise's json:// posts to it) and an SMTP server
(aiosmtpd), each serving on 127.0.0.1 from a thread of the test process."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from aiosmtpd.controller import Controller

from .servers import free_port

if TYPE_CHECKING:
    from typing_extensions import Self


class LocalHttpServer:
    """``handler`` served on 127.0.0.1 (``port``, or a free one) from a thread of
    the test process while the ``with`` block runs."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], port: int | None = None) -> None:
        self.port = port or free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class HttpReceiver(LocalHttpServer):
    """Records every POST when it arrives: its path and body (parsed as JSON when
    it is JSON). Answers it ``delay`` seconds later (a slow receiver; the
    attribute may change between deliveries), with the next status of
    ``statuses``, then 200."""

    def __init__(self, port: int | None = None, *, delay: float = 0.0, statuses: Sequence[int] = ()) -> None:
        self.delay = delay
        self.statuses = list(statuses)
        self.posts: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    parsed: Any = json.loads(body)
                except ValueError:
                    parsed = body.decode("utf-8", "replace")
                with receiver._lock:
                    receiver.posts.append((self.path, parsed))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    delay = receiver.delay
                time.sleep(delay)
                with contextlib.suppress(OSError):  # the sender may have given up (or been killed)
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(Handler, port)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def received(self, path: str | None = None) -> list[Any]:
        """The bodies posted (to ``path`` only, when given), oldest first."""
        with self._lock:
            return [body for where, body in self.posts if path is None or where == path]


class Mailbox:
    """aiosmtpd handler keeping every message."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


@contextlib.contextmanager
def smtp_server() -> Iterator[tuple[int, Mailbox]]:
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, mailbox
    finally:
        controller.stop()
