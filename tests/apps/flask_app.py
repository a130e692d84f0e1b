"""A Flask app for the wsgiref and gunicorn tests.

``app`` is ``netprof_core.wsgi.NetProfMiddleware(flask_app)``, made before
the app serves anything, unless NETPROF_TEST_WRAP=0; ``/healthz`` excluded.
"""

from __future__ import annotations

import atexit
import time
from collections.abc import Iterator

from flask import Flask, Response, jsonify, request

from netprof_core.wsgi import NetProfMiddleware

from .common import EXCLUDE_PATHS, STREAM_CHUNK, STREAM_CHUNKS, STREAM_SLEEP, note_event, wrapped

flask_app = Flask(__name__)


@flask_app.route("/items/<int:item_id>", methods=["GET", "POST"])
def item(item_id: int) -> Response:
    response = jsonify(item_id=item_id, method=request.method, received=len(request.get_data()))
    response.headers["X-Item"] = str(item_id)
    return response


@flask_app.route("/users/<user>/orders/<int:order_id>")
def order(user: str, order_id: int) -> str:
    return f"user {user} order {order_id}"


@flask_app.route("/boom")
def boom() -> str:
    raise RuntimeError("boom: an application error")


@flask_app.route("/healthz")
def healthz() -> str:
    return "ok"


@flask_app.route("/stream")
def stream() -> Response:
    def chunks() -> Iterator[bytes]:
        for i in range(STREAM_CHUNKS):
            if i:
                time.sleep(STREAM_SLEEP)
            yield STREAM_CHUNK

    return Response(chunks(), mimetype="application/octet-stream")


app = NetProfMiddleware(flask_app, exclude_paths=EXCLUDE_PATHS) if wrapped() else flask_app

note_event("startup")  # in each gunicorn worker: the app is loaded after the fork
atexit.register(note_event, "shutdown")
