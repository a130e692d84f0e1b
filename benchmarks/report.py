#!/usr/bin/env python3
"""Per-call medians and ratios from a pytest-benchmark JSON file.

    pytest benchmarks/ --benchmark-json=bench.json && python benchmarks/report.py bench.json
"""

from __future__ import annotations

import json
import sys

CALLS = 1000
FLOOR = "test_floor_empty_cdef_method"
CYTHON = "test_record[cython]"
PROMETHEUS = "test_prometheus_client_histogram"
# Benchmarks of one whole operation each (not CALLS calls): reported in ms.
WHOLE_OPERATIONS = ("test_snapshot", "test_daemon_", "test_multiprocess_collector")


def main(path: str) -> int:
    with open(path) as file:
        data = json.load(file)
    # The overhead checks (test_overhead_checks.py) serve requests_per_round requests a round.
    per_call = {
        bench["name"]: bench["stats"]["median"] / bench["extra_info"].get("requests_per_round", CALLS) * 1e9
        for bench in data["benchmarks"]
        if not bench["name"].startswith(WHOLE_OPERATIONS)
    }
    whole = {b["name"]: b for b in data["benchmarks"] if b["name"].startswith(WHOLE_OPERATIONS[1:])}
    overheads = {b["name"]: b["extra_info"] for b in data["benchmarks"] if "overhead_us" in b["extra_info"]}
    snapshots = {b["name"]: b["stats"]["median"] * 1e3 for b in data["benchmarks"] if b["name"].startswith("test_snapshot")}
    machine = data.get("machine_info", {})
    print(f"{machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('python_version', '?')}")
    print(f"{'benchmark':45} {'median ns/call':>15} {'x floor':>9}")
    floor = per_call.get(FLOOR)
    for name, ns in per_call.items():
        ratio = f"{ns / floor:9.2f}" if floor else f"{'-':>9}"
        print(f"{name:45} {ns:15.1f} {ratio}")
    if CYTHON in per_call and PROMETHEUS in per_call:
        print(f"\nprometheus_client Histogram.labels().observe() / Cython record(): "
              f"{per_call[PROMETHEUS] / per_call[CYTHON]:.1f}x")
    for name, info in overheads.items():
        print(f"{name}: netprof overhead {info['overhead_us']:.2f} µs/request "
              f"({info['bare_median_us']:.2f} bare, bound {info['max_overhead_us']} µs)")
    for name, ms in snapshots.items():
        print(f"{name}: {ms:.2f} ms per snapshot")
    _daemon_report(whole)
    return 0


def _daemon_report(whole: dict[str, dict[str, object]]) -> None:
    """netprofd beside MultiProcessCollector, per process count; and its footprint."""
    medians = {name: b["stats"]["median"] * 1e3 for name, b in whole.items()}  # type: ignore[index]
    for n in ("8procs", "64procs"):
        collector = medians.get(f"test_multiprocess_collector[{n}]")
        for kind in ("tick", "tick_all_routes", "cold_snapshot"):
            ours = medians.get(f"test_daemon_{kind}[{n}]")
            if ours is not None and collector is not None:
                print(f"netprofd {kind} {n}: {ours:.2f} ms; MultiProcessCollector {collector:.2f} ms: "
                      f"{collector / ours:.1f}x")
    for name, bench in whole.items():
        info = bench.get("extra_info") or {}
        if "daemon_rss_mib" in info:  # type: ignore[operator]
            print(f"{name}: netprofd RSS {info['daemon_rss_mib']} MiB, "  # type: ignore[index]
                  f"CPU {info['daemon_cpu_percent_of_core']} % of a core")  # type: ignore[index]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench.json"))
