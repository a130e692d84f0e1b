"""What the fuzzing suite (tests/test_fuzz_*.py) shares: its hypothesis
profiles, and the values that break parsers most often.

CI runs the ``netprof-fuzz`` profile: derandomized (the same examples on every
run, so a red CI is reproducible by running the test again), no example
database, no deadline (the machine is shared), each test with the examples it
asks for. To look further on a developer's machine::

    NETPROF_FUZZ_PROFILE=netprof-fuzz-explore NETPROF_FUZZ_SCALE=20 \
        .venv/bin/pytest tests/test_fuzz_api.py -q -p no:cacheprovider

``netprof-fuzz-explore`` draws new random examples on each run and prints
the reproduction blob of a failure (``@reproduce_failure``).
"""

from __future__ import annotations

import math
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

__all__ = ("AWKWARD_JSON", "AWKWARD_NUMBERS", "HUGE_INTS", "NUMBER_TEXTS", "fuzz_settings")

_SUPPRESSED = [
    HealthCheck.function_scoped_fixture,  # the fixtures are reused by every example on purpose
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
]
settings.register_profile(
    "netprof-fuzz",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=False,
    suppress_health_check=_SUPPRESSED,
)
settings.register_profile(
    "netprof-fuzz-explore",
    derandomize=False,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=_SUPPRESSED,
)
PROFILE = os.environ.get("NETPROF_FUZZ_PROFILE", "netprof-fuzz")
SCALE = float(os.environ.get("NETPROF_FUZZ_SCALE", "1"))


def fuzz_settings(max_examples: int) -> settings:
    """The suite's profile with ``max_examples`` (times NETPROF_FUZZ_SCALE):
    each test's count is chosen to keep the whole suite within about a
    minute per install on two cores."""
    return settings(settings.get_profile(PROFILE), max_examples=max(1, math.ceil(max_examples * SCALE)))


# Numbers past every float, and past 64 bits (JSON carries any integer; TOML 64 bits).
HUGE = (2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**308, 10**309, 10**400, -(10**400))
HUGE_INTS = st.sampled_from(HUGE)

# Texts that number parsers disagree on: Python's int() and float() take some
# of them (underscores, other scripts' digits, spaces), str.isdigit() others
# (superscripts), JSON and TOML yet others.
AWKWARD_NUMBERS = (
    "", " ", "0", "-0", "+0", "00", "-1", "1", "5", "12", "1e3", "1E-3", ".5", "5.", "1_000", "0x10", "0o7",
    "0b1", "nan", "NaN", "-nan", "inf", "-inf", "Infinity", "-Infinity", "1e308", "1e309", "-1e309",
    "4.9e-324", "1e-400", "9" * 30, "9" * 400, "9" * 5000, "\u00b2", "\u00b9\u00b2", "\u0663",
    "\u0661\u0662\u0663", "\uff11", " 5", "5 ", "\t5", "5\n", "5\x00", "1,5", "1.5.5", "--1", "+-1", "1e",
    "e1", "0.0000001", "100000", "100001", "1000001", "10000001", "18446744073709551616",
    *(str(n) for n in HUGE),
)  # fmt: skip
NUMBER_TEXTS = st.sampled_from(AWKWARD_NUMBERS)
# JSON values where a number, a string or a list is expected: each kind, at its edges.
AWKWARD_JSON: tuple[object, ...] = (
    None, True, False, 0, -1, 0.5, 1e308, -1e308, math.nan, math.inf, -math.inf, *HUGE, "", "x", "1h", "2h",
    "9" * 400, "nan", [], {}, [[]], {"a": 1}, [1, "x"], "2026-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+23:59", "x" * 5000,
)  # fmt: skip
