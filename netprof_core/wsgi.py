"""WSGI middleware: ``app = NetProfMiddleware(app)`` records every request.

A streamed response ends when the server closes it, so it is timed to its
end; a list (the whole body at once) or a ``wsgi.file_wrapper`` is recorded
when the app returns it, and handed to the server unchanged. The route is the ``route_key`` given, else
Flask's URL rule when the app is a Flask app, else Django's route when
``netprof_core.django`` noted it, else one UNMATCHED_ROUTE for all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ._hookpaths import hook_path
from .hooks import ROUTE_ENVIRON_KEY, InboundHook
from .log import logger
from .recorder import Recorder

__all__ = ("NetProfMiddleware",)

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]
RouteKey = Callable[[Environ], "str | None"]


class NetProfMiddleware(InboundHook):
    """Records each request of a WSGI application; see the ASGI middleware
    of the same name for the arguments. Safe under threaded and pre-forking
    servers: each thread times its own request, each process has its segment.

    Given a Flask app (or its ``wsgi_app``), it adds a URL value preprocessor
    that notes the URL rule the request matched (it runs before any
    ``before_request`` function, which may answer early). Behind another WSGI
    wrapper (ProxyFix...), pass ``route_key`` instead.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        recorder: Recorder | None = None,
        exclude_paths: Iterable[str] = (),
        route_key: RouteKey | None = None,
    ) -> None:
        super().__init__(app, recorder, exclude_paths, route_key)
        _note_flask_rules(app)
        # The per-request work, compiled beside the Cython core (see _wsgi_py.py).
        self._serve = hook_path("wsgi", self.recorder.implementation).WsgiRequests(self).serve

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return self._serve(environ, start_response)  # type: ignore[no-any-return]


def _note_flask_rules(app: Any) -> None:
    """Flask keeps the matched URL rule on its request object, which is gone
    by the time the middleware records: copy it into the environ."""
    flask_app = getattr(app, "__self__", app)  # app.wsgi_app is a bound method
    if not (hasattr(flask_app, "url_map") and hasattr(flask_app, "url_value_preprocessor")):
        return
    try:
        from flask import request
    except ImportError:
        return

    def note_rule(endpoint: str | None, values: dict[str, Any] | None) -> None:
        rule = request.url_rule
        if rule is not None:
            request.environ[ROUTE_ENVIRON_KEY] = rule.rule

    try:
        flask_app.url_value_preprocessor(note_rule)
    except AssertionError:  # Flask refuses set-up once it has served a request
        logger.warning("netprof: wrap the Flask app before it serves requests to see its URL rules")
