"""Notification receivers for tests where netprofd runs in another process:
an HTTP endpoint (apprise's json:// posts to it) and an SMTP server
(aiosmtpd), each serving on 127.0.0.1 from a thread of the test process."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from aiosmtpd.controller import Controller

from .servers import free_port

if TYPE_CHECKING:
    from typing_extensions import Self


class HttpReceiver:
    """Records every POST body (parsed as JSON when it is JSON)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.posts: list[Any] = []
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
                    receiver.posts.append(parsed)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def received(self) -> list[Any]:
        with self._lock:
            return list(self.posts)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


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
