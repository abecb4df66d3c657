"""The per-master lock: exclusive, bounded wait, released by process death."""

import multiprocessing
import time
from pathlib import Path

import pytest

from cni_netkit.errors import TryAgainLater
from cni_netkit.plugin.lock import master_lock


def _hold(state_dir: str, ready: "multiprocessing.synchronize.Event", seconds: float) -> None:
    with master_lock(state_dir, "eth0", 1):
        ready.set()
        time.sleep(seconds)


def test_second_holder_times_out_with_code_11(tmp_path: Path) -> None:
    ready = multiprocessing.Event()
    p = multiprocessing.Process(target=_hold, args=(str(tmp_path), ready, 5))
    p.start()
    try:
        assert ready.wait(5)
        t0 = time.monotonic()
        with pytest.raises(TryAgainLater) as e, master_lock(str(tmp_path), "eth0", 0.2):
            pass
        assert e.value.code == 11
        assert 0.2 <= time.monotonic() - t0 < 2
    finally:
        p.kill()
        p.join()


def test_lock_of_a_killed_holder_is_free(tmp_path: Path) -> None:
    ready = multiprocessing.Event()
    p = multiprocessing.Process(target=_hold, args=(str(tmp_path), ready, 60))
    p.start()
    assert ready.wait(5)
    p.kill()
    p.join()
    with master_lock(str(tmp_path), "eth0", 1):
        pass


def test_masters_lock_independently(tmp_path: Path) -> None:
    with master_lock(str(tmp_path), "eth0", 0.1), master_lock(str(tmp_path), "eth1", 0.1):
        pass
