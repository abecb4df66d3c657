"""Queue choice: pure functions of the kernel's current view."""

import pytest

from cni_netkit.errors import PoolExhausted
from cni_netkit.pool import choose, format_pool, free_queues


def test_free_queues_are_pool_queues_that_exist_and_are_unused() -> None:
    assert free_queues([8, 9, 10, 11], existing=range(10), in_use={9}) == [8]


def test_free_queues_ignores_duplicates_and_sorts() -> None:
    assert free_queues([3, 1, 3, 2], existing=range(4), in_use=()) == [1, 2, 3]


def test_choose_prefers_lowest_contiguous_run() -> None:
    assert choose([8, 10, 11, 12, 14], 3, master="eth0", pool=range(8, 16)) == (10, 11, 12)


def test_choose_falls_back_to_lowest_ids_without_a_run() -> None:
    assert choose([8, 10, 12], 2, master="eth0", pool=range(8, 16)) == (8, 10)


def test_choose_single_takes_lowest() -> None:
    assert choose([12, 9], 1, master="eth0", pool=[9, 12]) == (9,)


def test_exhaustion_names_master_and_pool() -> None:
    with pytest.raises(PoolExhausted) as e:
        choose([8], 2, master="eth0", pool=[8, 9, 10, 12])
    assert e.value.code == 100
    assert "eth0" in e.value.msg
    assert "8-10,12" in e.value.details


def test_choose_rejects_nonpositive_count() -> None:
    with pytest.raises(ValueError, match="count"):
        choose([1], 0, master="eth0", pool=[1])


@pytest.mark.parametrize(
    ("pool", "text"),
    [([8, 9, 10, 11], "8-11"), ([1, 3, 5], "1,3,5"), ([5, 1, 2, 3, 9, 10], "1-3,5,9-10"), ([], "")],
)
def test_format_pool(pool: list[int], text: str) -> None:
    assert format_pool(pool) == text
