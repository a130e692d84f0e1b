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


def main(path: str) -> int:
    with open(path) as file:
        data = json.load(file)
    per_call = {
        bench["name"]: bench["stats"]["median"] / CALLS * 1e9
        for bench in data["benchmarks"]
        if not bench["name"].startswith("test_snapshot")
    }
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
    for name, ms in snapshots.items():
        print(f"{name}: {ms:.2f} ms per snapshot")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench.json"))
