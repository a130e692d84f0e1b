"""The ``netprof_overhead`` fixture (plugins/pytest_overhead.py), as a user's
test suite sees it: each test writes a user's test file and runs pytest on it
in process, with the plugin loaded from its ``pytest11`` entry point. The bounds
are either generous or impossible, so no outcome here depends on the machine."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _a_users_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's pytest runs on its own: not as a worker of this suite's
    pytest-xdist run (pytest-benchmark would switch itself off)."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)

# Short runs: a few rounds are enough to see the fixture work.
FAST = ("-p", "no:cacheprovider", "--benchmark-min-rounds=10", "--benchmark-max-time=0.005")

APPS = '''
import pytest
from netprof_core import ProfilingConfig
from netprof_core.asgi import NetProfMiddleware


async def asgi_app(scope, receive, send):
    """Answers 200 with the request body it read, 404 off /items/1."""
    body = (await receive())["body"] if scope["method"] == "POST" else b"OK"
    status = 200 if scope["path"] == "/items/1" else 404
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": body})


def wsgi_app(environ, start_response):
    assert environ["QUERY_STRING"] == "q=1" and environ["HTTP_X_TOKEN"] == "t"
    body = environ["wsgi.input"].read(int(environ["CONTENT_LENGTH"]))
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
'''


def run(pytester: pytest.Pytester, tests: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_user=APPS + tests)
    return pytester.runpytest(*FAST, *args)


def test_the_entry_point_loads_the_plugin(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
def test_registered(request):
    import netprof_plugins.pytest_overhead
    assert request.config.pluginmanager.get_plugin("netprof") is netprof_plugins.pytest_overhead
""",
    )
    result.assert_outcomes(passed=1)


def test_asgi_app_within_a_generous_bound_passes(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
def test_overhead(netprof_overhead, benchmark):
    result = netprof_overhead.asgi(asgi_app, path="/items/1", method="POST", body=b"hi", max_overhead_us=1000)
    assert result.hook == "asgi" and result.bound_checked and result.rounds >= 3
    assert result.requests_recorded == 1 + (result.rounds + 1) * result.requests_per_round
    assert result.overhead_us == result.wrapped_median_us - result.bare_median_us
    assert benchmark.extra_info["overhead_us"] == result.overhead_us
""",
        "--benchmark-json=bench.json",
    )
    result.assert_outcomes(passed=1)
    (bench,) = json.loads((pytester.path / "bench.json").read_text())["benchmarks"]
    info = bench["extra_info"]
    assert info["max_overhead_us"] == 1000 and info["requests_per_round"] == 100
    assert {"bare_median_us", "wrapped_median_us", "overhead_us"} <= info.keys()
    # What pytest-benchmark records is the wrapped app's rounds.
    assert bench["stats"]["median"] / 100 * 1e6 == pytest.approx(info["wrapped_median_us"])


def test_an_impossible_bound_fails_naming_overhead_and_bound(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
def test_overhead(netprof_overhead):
    netprof_overhead.asgi(asgi_app, path="/items/1", max_overhead_us=0.0001)
""",
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        ["*NetProfMiddleware (asgi, * core) adds * µs per request, above the bound of 0.0001 µs*"]
    )
    result.stdout.fnmatch_lines(["*median per request * µs through the middleware, * µs bare*"])


def test_wsgi_app_gets_a_whole_request(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
def test_overhead(netprof_overhead):
    result = netprof_overhead.wsgi(
        wsgi_app, path="/items/1?q=1", method="POST", headers=[("X-Token", "t")], body=b"hello",
        max_overhead_us=1000, requests_per_round=10,
    )
    assert result.hook == "wsgi" and result.requests_per_round == 10 and result.bound_checked
""",
    )
    result.assert_outcomes(passed=1)


def test_a_hook_that_does_not_record_fails(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
def test_profiling_disabled(netprof_overhead):
    netprof_overhead.asgi(asgi_app, path="/items/1", max_overhead_us=1000, config=ProfilingConfig(enabled=False))


def test_broken_hook(netprof_overhead, monkeypatch):
    async def passthrough(self, scope, receive, send):
        await self.app(scope, receive, send)

    monkeypatch.setattr(NetProfMiddleware, "__call__", passthrough)
    netprof_overhead.asgi(asgi_app, path="/items/1", max_overhead_us=1000)


def test_wrong_status(netprof_overhead):
    netprof_overhead.asgi(asgi_app, path="/nowhere", max_overhead_us=1000)
""",
    )
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            "*served * requests but its segment counts 0 recorded, 0 sampled out, * while disabled*",
            "*served * requests but its segment counts 0 recorded, 0 sampled out, 0 while disabled*",
            "*the app answered 404 to GET /nowhere, not 200*",
        ]
    )


def test_command_line_and_ini_set_the_bound(pytester: pytest.Pytester) -> None:
    tests = """
def test_default_bound(netprof_overhead):
    netprof_overhead.asgi(asgi_app, path="/items/1")


def test_explicit_bound_wins(netprof_overhead):
    assert netprof_overhead.asgi(asgi_app, path="/items/1", max_overhead_us=1000).max_overhead_us == 1000
"""
    run(pytester, tests).assert_outcomes(passed=2)  # no bound: measured only
    for config in (("--netprof-max-overhead-us=0.0001",), ()):
        if not config:
            pytester.makeini("[pytest]\nnetprof_max_overhead_us = 0.0001\n")
        result = run(pytester, tests, *config)
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(["*above the bound of 0.0001 µs*", "FAILED test_user.py::test_default_bound*"])
    # The command line wins over the ini file.
    run(pytester, tests, "--netprof-max-overhead-us=1000").assert_outcomes(passed=2)


def test_a_bad_bound_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nnetprof_max_overhead_us = fast\n")
    result = run(pytester, "def test_overhead(netprof_overhead):\n    pass\n")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*netprof_max_overhead_us = 'fast' in *tox.ini: expected a number of microseconds*"])


def test_benchmark_only_and_skip_see_a_benchmark(pytester: pytest.Pytester) -> None:
    tests = """
def test_overhead(netprof_overhead):
    netprof_overhead.asgi(asgi_app, path="/items/1", max_overhead_us=1000)


def test_other():
    pass
"""
    only = run(pytester, tests, "--benchmark-only", "-rs")
    only.assert_outcomes(passed=1, skipped=1)
    only.stdout.fnmatch_lines(["SKIPPED * test_user.py*: Skipping non-benchmark (--benchmark-only active).*"])
    skip = run(pytester, tests, "--benchmark-skip", "-rs")
    skip.assert_outcomes(passed=1, skipped=1)
    skip.stdout.fnmatch_lines(["SKIPPED * test_user.py*: Skipping benchmark (--benchmark-skip active).*"])


def test_benchmark_disable_checks_the_recording_not_the_bound(pytester: pytest.Pytester) -> None:
    result = run(
        pytester,
        """
def test_impossible_bound(netprof_overhead):
    result = netprof_overhead.wsgi(wsgi_app, path="/items/1?q=1", headers=[("X-Token", "t")], body=b"x",
                                   max_overhead_us=0.0001)
    assert not result.bound_checked and result.overhead_us is None and result.requests_recorded == 6


def test_broken_hook(netprof_overhead):
    netprof_overhead.asgi(asgi_app, path="/items/1", config=ProfilingConfig(enabled=False))
""",
        "--benchmark-disable",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*NetProfOverheadWarning: benchmarks are disabled*the overhead bound was not checked*"])
