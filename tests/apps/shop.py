"""The shop: tests/apps/starlette_app.py under a real uvicorn, recording with the
compiled core into a segment directory of its own, for the tests where netprofd
alerts on an app's errors (tests/test_alerting.py, tests/test_trust_alerting.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx

from .servers import REQUEST_TIMEOUT, Server, free_port, running, server_env, uvicorn_argv, write_config

APP = "shop"


class Shop:
    """The running app, where its segments go, and the test's directory (for the daemon's files)."""

    def __init__(self, server: Server, segment_dir: Path, tmp: Path) -> None:
        self.server = server
        self.segment_dir = segment_dir
        self.tmp = tmp
        # uvicorn closes the connection after an app exception: one connection per request.
        self.http = httpx.Client(
            base_url=server.base_url, timeout=REQUEST_TIMEOUT, headers={"connection": "close"}
        )

    def send(self, good: int, bad: int = 0) -> None:
        """``good`` requests answered 200 and ``bad`` ones that fail (500), interleaved."""
        for i in range(max(good, bad)):
            if i < good:
                self.http.get(f"/items/{i}")
            if i < bad:
                self.http.get("/boom")


@contextlib.contextmanager
def shop_running(tmp: Path) -> Iterator[Shop]:
    """The shop on a free port, its segment directory, config and log in ``tmp``."""
    segment_dir = tmp / "segments"
    segment_dir.mkdir()
    config = write_config(tmp / "app.toml", segment_dir, APP)
    port = free_port()
    argv = uvicorn_argv("tests.apps.starlette_app:app", port)
    with running(
        argv, env=server_env("cython", config=config), port=port, log_path=tmp / "app.log"
    ) as server:
        shop = Shop(server, segment_dir, tmp)
        try:
            yield shop
        finally:
            shop.http.close()
