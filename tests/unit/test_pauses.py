"""Start-up's objects are moved out of the cycle collector's sight (pauses.py)."""

from __future__ import annotations

import gc
import weakref

from pydriver.pauses import freeze_startup_objects


def test_start_up_objects_are_frozen_and_garbage_is_collected_first() -> None:
    class Cycle:
        me: object

    garbage = Cycle()
    garbage.me = garbage
    collected = weakref.ref(garbage)
    del garbage
    try:
        frozen = freeze_startup_objects()
        assert frozen == gc.get_freeze_count() > 1000  # this test process's modules at least
        assert collected() is None  # not frozen: collected just before
        # What is made afterwards is still collected.
        later = Cycle()
        later.me = later
        del later
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
