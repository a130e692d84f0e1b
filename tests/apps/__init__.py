"""Applications and server helpers for the tests on real servers.

The apps are started in their own processes (uvicorn, gunicorn, wsgiref) by
``tests/test_asgi_servers.py``, ``tests/test_wsgi_servers.py`` and
``tests/test_gunicorn.py``; :mod:`tests.apps.servers` starts and stops them.

What the apps read from their environment:

- ``NETPROF_CONFIG``: netprof's config file (segment directory, app name);
- ``NETPROF_TEST_WRAP``: ``"0"`` serves the app without netprof, for the
  byte-for-byte comparisons; anything else wraps it;
- ``NETPROF_TEST_EVENTS``: a file the app appends a line to at start-up and
  shutdown (``startup <pid> <core>``, ``shutdown <pid>``), so the tests know
  the lifespan ran, which core recorded, and when every worker is up.
"""
