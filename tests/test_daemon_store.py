"""The daemon's segment store: ended processes are folded exactly once."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from netprof_core import Recorder
from netprof_daemon.store import SegmentStore


def test_a_folded_segment_that_could_not_be_removed_is_not_counted_again(
    make_recorder: Callable[..., Recorder], segment_dir: Path, tmp_path: Path
) -> None:
    recorder = make_recorder(app_name="once")
    route = recorder.route_id("/x")
    for _ in range(10):
        recorder.record(route, 200, 0, 1000)
    path = Path(recorder.path)
    keep = tmp_path / "copy.npseg"
    store = SegmentStore(segment_dir, tmp_path / "state")
    store.refresh()
    recorder.close()  # marked closed: the next tick folds and removes it
    shutil.copy(path, keep)
    store.refresh()
    assert not path.exists() and store.apps()["once"].counters.requests == 10
    shutil.copy(keep, path)  # as if the removal had failed
    for _ in range(3):
        store.refresh()
    assert store.apps()["once"].counters.requests == 10
    store.close()
    # Also after a restart of the daemon (the folded names are kept with the totals).
    again = SegmentStore(segment_dir, tmp_path / "state")
    again.refresh()
    assert again.apps()["once"].counters.requests == 10
    again.close()
