#!/usr/bin/env python3
"""What the httpx hook adds to a request, measured by paired blocks: a figure
of wall-clock time that a shared machine's noise does not swamp.

    PYTHONPATH=. python benchmarks/paired_httpx.py [ROUNDS]

An httpx request to ``MockTransport`` takes about 80 µs, and on a shared
machine two pytest-benchmark figures of it, taken a minute apart, differ by
more than the hook costs (``test_client_benchmarks.py``). Here a bare and an
instrumented client take turns, ROUNDS times (default 150), each sending a
block of BLOCK requests, the order swapped every round so that neither always
runs first. Each round gives one difference per request, instrumented minus
bare, measured under the same load; the median over the rounds is the hook's
cost, and drifts in the machine's speed cancel out. Sync and async clients,
with the Cython core.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_client_benchmarks import URL, handler

from netprof_core import ProfilingConfig, Recorder
from netprof_core.clients import instrument_httpx_client

BLOCK = 200
WARMUP = 2000


def _paired(bare: Callable[[int], float], hooked: Callable[[int], float], rounds: int) -> list[float]:
    """Per-request differences, hooked minus bare, one per round."""
    bare(WARMUP)
    hooked(WARMUP)
    differences = []
    for round_ in range(rounds):
        if round_ % 2:
            base = bare(BLOCK)
            differences.append(hooked(BLOCK) - base)
        else:
            with_hook = hooked(BLOCK)
            differences.append(with_hook - bare(BLOCK))
    return differences


def _sync_block(client: httpx.Client) -> Callable[[int], float]:
    def block(requests: int) -> float:
        start = time.perf_counter_ns()
        for _ in range(requests):
            client.get(URL)
        return (time.perf_counter_ns() - start) / requests

    return block


def _async_block(client: httpx.AsyncClient, loop: asyncio.AbstractEventLoop) -> Callable[[int], float]:
    async def requests_(requests: int) -> float:
        start = time.perf_counter_ns()
        for _ in range(requests):
            await client.get(URL)
        return (time.perf_counter_ns() - start) / requests

    def block(requests: int) -> float:
        return loop.run_until_complete(requests_(requests))

    return block


def _report(name: str, differences: list[float], bare: Callable[[int], float]) -> None:
    low, median, high = statistics.quantiles(differences, n=4)
    print(
        f"{name}: the hook adds {median / 1000:.2f} µs a request (median of {len(differences)} paired blocks "
        f"of {BLOCK}; quartiles {low / 1000:.2f}..{high / 1000:.2f} µs), beside {bare(BLOCK) / 1000:.1f} µs bare"
    )


def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="netprof-paired-") as segment_dir:
        recorder = Recorder(
            ProfilingConfig(segment_dir=segment_dir, app_name="paired"), implementation="cython"
        )
        with (
            httpx.Client(transport=httpx.MockTransport(handler)) as bare,
            httpx.Client(transport=httpx.MockTransport(handler)) as hooked,
        ):
            instrument_httpx_client(hooked, recorder)
            _report(
                "httpx.Client", _paired(_sync_block(bare), _sync_block(hooked), rounds), _sync_block(bare)
            )

        loop = asyncio.new_event_loop()
        bare_async = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        hooked_async = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        instrument_httpx_client(hooked_async, recorder)
        try:
            differences = _paired(_async_block(bare_async, loop), _async_block(hooked_async, loop), rounds)
            _report("httpx.AsyncClient", differences, _async_block(bare_async, loop))
        finally:
            loop.run_until_complete(bare_async.aclose())
            loop.run_until_complete(hooked_async.aclose())
            loop.close()
        recorder.close(remove=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 150)
