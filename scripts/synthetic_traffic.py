#!/usr/bin/env python3
"""Record synthetic traffic from a few worker processes, then show `netprof stats`.

The README's first command: it shows netprof's main job end to end without a
web server. Each worker is a forked process with its own segment, as under
gunicorn; the table merges them.
"""

from __future__ import annotations

import argparse
import multiprocessing
import random
import shutil
import sys
import tempfile
import time

from netprof_core import IMPLEMENTATION, Direction, ErrorKind, ProfilingConfig, Recorder, read_segments
from netprof_core.cli import main as netprof_main

ROUTES = [  # direction, method, route, median latency (s), error rate
    (Direction.INBOUND, "GET", "/items/{item_id}", 0.004, 0.01),
    (Direction.INBOUND, "POST", "/orders", 0.030, 0.05),
    (Direction.INBOUND, "GET", "/healthz", 0.0002, 0.0),
    (Direction.OUTBOUND, "GET", "payments.internal", 0.050, 0.08),
    (Direction.OUTBOUND, "POST", "search.internal", 0.012, 0.02),
]


def worker(segment_dir: str, requests: int, seed: int) -> None:
    config = ProfilingConfig(
        segment_dir=segment_dir,
        app_name="synthetic-shop",
        slow_request_threshold=0.1,
        log_slow_requests=False,
    )
    recorder = Recorder(config)
    route_ids = [recorder.route_id(route, method, direction) for direction, method, route, _, _ in ROUTES]
    rng = random.Random(seed)
    now = time.monotonic_ns()
    for _ in range(requests):
        which = rng.randrange(len(ROUTES))
        direction, _, _, median, error_rate = ROUTES[which]
        duration = int(rng.lognormvariate(0, 0.6) * median * 1e9)
        failed = rng.random() < error_rate
        if direction == Direction.OUTBOUND and failed and rng.random() < 0.5:
            status, kind = 0, ErrorKind.TIMEOUT
        else:
            status, kind = (503 if failed else 200), ErrorKind.NONE
        recorder.record(
            route_ids[which],
            status,
            now,
            now + duration,
            rng.randrange(100, 2000),
            rng.randrange(200, 20000),
            kind,
        )
        now += duration
    recorder.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--requests", type=int, default=100_000, help="per worker")
    parser.add_argument(
        "--segment-dir", help="keep the segments here (default: a temporary directory, removed)"
    )
    args = parser.parse_args()

    segment_dir = args.segment_dir or tempfile.mkdtemp(prefix="netprof-synthetic-")
    context = multiprocessing.get_context("fork")
    started = time.perf_counter()
    workers = [
        context.Process(target=worker, args=(segment_dir, args.requests, seed))
        for seed in range(args.workers)
    ]
    for process in workers:
        process.start()
    for process in workers:
        process.join()
    elapsed = time.perf_counter() - started
    snapshots = read_segments(segment_dir, records=False)
    print(
        f"{args.workers} worker processes recorded {args.requests * args.workers} requests "
        f"in {elapsed:.2f} s with the {IMPLEMENTATION} core; {len(snapshots)} segments in {segment_dir}\n"
    )
    try:
        return netprof_main(["stats", "--segment-dir", segment_dir])
    finally:
        if not args.segment_dir:
            shutil.rmtree(segment_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
