"""A real, small tmpfs for the tests of full or read-only file systems (a
container's /dev/shm is 64 MiB: filling it would starve every other test)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str, mode: str = "0755") -> Iterator[Path]:
    """A tmpfs of ``size`` (mount's spelling: ``2m``, ``512k``) at ``path``, made
    if missing, its root directory of ``mode``; unmounted when the block ends.
    Skips the test without root, or where mounting fails."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode={mode}", "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        # Lazily: a process of the test may still hold a file open in it.
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
