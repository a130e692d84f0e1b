"""``awaiting``, which the async hooks return instead of a coroutine of their
own: its C twin (``_awaiting_c.pyx``) must behave as the ``async def`` of its
pure-Python twin in every way an awaiting caller can see, and report each
await's end exactly once."""

from __future__ import annotations

import asyncio
import collections.abc
import gc
import types
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from netprof_core import _awaiting_py
from netprof_core._recorder import NO_EXTENSIONS


def _twins() -> list[Any]:
    twins: list[Any] = [pytest.param(_awaiting_py, id="python")]
    compiled: ModuleType | None = None
    if not NO_EXTENSIONS:
        try:
            from netprof_core import _awaiting_c as compiled
        except ImportError:  # an editable tree without the build
            compiled = None
    twins.append(
        pytest.param(
            compiled, id="cython", marks=pytest.mark.skipif(compiled is None, reason="no Cython build")
        )
    )
    return twins


@pytest.fixture(params=_twins())
def awaiting(request: pytest.FixtureRequest) -> Callable[..., Any]:
    return request.param.awaiting  # type: ignore[no-any-return]


class Ends:
    """The on_end calls an awaiting made, as (context, result, exception type, start)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any, Any, Any]] = []
        self.tracebacks: list[bool] = []  # the exception had its traceback when reported

    def __call__(self, context: Any, result: Any, exc: BaseException | None, start: Any) -> None:
        self.calls.append((context, result, None if exc is None else type(exc), start))
        self.tracebacks.append(exc is not None and exc.__traceback__ is not None)


async def _returns(value: Any, pause: float = 0.0) -> Any:
    if pause:
        await asyncio.sleep(pause)
    return value


class Pause:
    """An awaitable that suspends once, with no event loop needed."""

    def __await__(self) -> Any:
        yield "paused"


async def _paused() -> int:
    await Pause()
    return 1


@pytest.mark.parametrize("value", [5, None, (1, 2), KeyError("a value, not raised"), StopIteration(3)])
def test_the_result_comes_through_as_it_was(awaiting, value) -> None:
    ends = Ends()
    result = asyncio.run(awaiting(_returns(value, 0.001), ends, "ctx", 7))
    assert result is value
    assert ends.calls == [("ctx", value, None, 7)]


def test_an_exception_goes_on_unchanged_and_is_reported(awaiting) -> None:
    ends = Ends()
    raised = ValueError("the app's")

    async def fails() -> None:
        await asyncio.sleep(0)
        raise raised

    async def main() -> None:
        await awaiting(fails(), ends, "ctx", 1)

    with pytest.raises(ValueError) as caught:
        asyncio.run(main())
    assert caught.value is raised
    assert ends.calls == [("ctx", None, ValueError, 1)]
    # The report sees the traceback to where it was raised (the ASGI hook reads it).
    assert ends.tracebacks == [True]


def test_any_awaitable_is_awaited(awaiting) -> None:
    class Custom:
        def __await__(self) -> Any:
            yield from asyncio.sleep(0).__await__()
            return "custom"

    async def main() -> list[Any]:
        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.001, future.set_result, "future")
        return [await awaiting(Custom(), ends, 1, 0), await awaiting(future, ends, 2, 0)]

    ends = Ends()
    assert asyncio.run(main()) == ["custom", "future"]
    assert ends.calls == [(1, "custom", None, 0), (2, "future", None, 0)]


def test_it_is_a_coroutine_to_asyncio(awaiting) -> None:
    # asyncio.create_task and Task take it, as they take any collections.abc.Coroutine.
    async def main() -> Any:
        pending = awaiting(_returns("task", 0.001), ends, "t", 0)
        assert isinstance(pending, collections.abc.Coroutine)
        return await asyncio.create_task(pending)

    ends = Ends()
    assert asyncio.run(main()) == "task"
    assert ends.calls == [("t", "task", None, 0)]


def test_a_cancelled_await_is_reported_and_the_cancellation_goes_on(awaiting) -> None:
    async def main() -> None:
        task = asyncio.ensure_future(awaiting(_returns(1, 10), ends, "c", 0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    ends = Ends()
    asyncio.run(main())
    assert ends.calls == [("c", None, asyncio.CancelledError, 0)]


def test_a_cancellation_the_awaited_handles_ends_with_its_result(awaiting) -> None:
    async def shrugs() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "handled"
        return "slept"

    async def main() -> Any:
        task = asyncio.ensure_future(awaiting(shrugs(), ends, "s", 0))
        await asyncio.sleep(0.01)
        task.cancel()
        return await task

    ends = Ends()
    assert asyncio.run(main()) == "handled"
    assert ends.calls == [("s", "handled", None, 0)]


def test_an_abandoned_await_is_reported_once_with_generator_exit(awaiting) -> None:
    ends = Ends()
    inner = _paused()
    pending = awaiting(inner, ends, "gone", 0)

    async def outer() -> Any:
        return await pending

    coroutine = outer()
    assert coroutine.send(None) == "paused"  # suspended, never resumed
    coroutine.close()
    coroutine.close()
    assert ends.calls == [("gone", None, GeneratorExit, 0)]
    assert inner.cr_frame is None  # closed too


def test_many_awaits_in_flight_each_report_their_own_end(awaiting) -> None:
    async def main() -> list[Any]:
        return await asyncio.gather(*(awaiting(_returns(i, 0.001 * (i % 3)), ends, i, -i) for i in range(50)))

    ends = Ends()
    assert asyncio.run(main()) == list(range(50))
    assert sorted(ends.calls) == [(i, i, None, -i) for i in range(50)]


def test_awaiting_makes_no_garbage_for_the_collector(awaiting) -> None:
    def noop(*_: Any) -> None:
        pass

    async def main() -> None:
        for _ in range(200):
            await awaiting(_returns(1), noop, None, 0)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
        gc.collect()
        gc.disable()
        try:
            loop.run_until_complete(main())
            assert gc.collect() == 0
        finally:
            gc.enable()
    finally:
        loop.close()


def test_freed_while_suspended_it_is_closed_and_reported(awaiting) -> None:
    # As a task destroyed with its loop leaves it: stepped once, then dropped.
    ends = Ends()
    inner = _paused()
    pending = awaiting(inner, ends, "dropped", 0)
    assert pending.send(None) == "paused"
    del pending
    gc.collect()
    assert ends.calls == [("dropped", None, GeneratorExit, 0)]
    assert inner.cr_frame is None


@pytest.mark.filterwarnings("ignore:coroutine '_paused' was never awaited")
def test_closed_or_thrown_into_before_its_first_step_it_reports_nothing(awaiting) -> None:
    ends = Ends()
    closed = awaiting(_paused(), ends, "closed", 0)
    closed.close()
    thrown = awaiting(_paused(), ends, "thrown", 0)
    with pytest.raises(asyncio.CancelledError):
        thrown.throw(asyncio.CancelledError())
    with pytest.raises(ValueError):
        awaiting(_paused(), ends, "typed", 0).throw(ValueError)
    assert ends.calls == []


def test_what_await_takes_it_takes_and_what_await_refuses_it_refuses(awaiting) -> None:
    @types.coroutine
    def generator_based() -> Any:
        yield "paused"
        return "generator"

    def drive(pending: Any) -> Any:
        async def outer() -> Any:
            return await pending

        coroutine = outer()
        try:
            while True:
                coroutine.send(None)
        except StopIteration as stop:
            return stop.value

    ends = Ends()
    assert drive(awaiting(generator_based(), ends, 1, 0)) == "generator"
    with pytest.raises(TypeError, match="can't be used in 'await' expression"):
        drive(awaiting(None, ends, 2, 0))
    assert ends.calls == [(1, "generator", None, 0), (2, None, TypeError, 0)]


def test_a_report_that_fails_is_logged_and_the_result_comes_through(awaiting, caplog) -> None:
    def broken(*_: Any) -> None:
        raise KeyError("the hook's bug")

    with caplog.at_level("ERROR", logger="netprof"):
        assert asyncio.run(awaiting(_returns("kept", 0.001), broken, None, 0)) == "kept"
    assert "could not be recorded" in caplog.text and "the hook's bug" in caplog.text
