"""Which pool queues to lease: pure functions of what the kernel reports now.

No locking and no kernel calls here; the plugin holds the master's lock, reads
the master's queues with ``queue-get``, and asks these functions.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from cni_netkit.errors import PoolExhausted


def free_queues(
    pool: Sequence[int], existing: Collection[int], in_use: Collection[int]
) -> list[int]:
    """Pool queues that exist on the master and nobody holds, ascending.

    ``existing``: RX queue ids the master has now (a pool entry beyond its
    ``real_num_rx_queues`` cannot be leased); ``in_use``: ids leased, bound by
    AF_XDP or a memory provider — by anyone, including foreign leases.
    """
    existing_set, in_use_set = set(existing), set(in_use)
    return sorted(q for q in set(pool) if q in existing_set and q not in in_use_set)


def choose(free: Sequence[int], count: int, *, master: str, pool: Sequence[int]) -> tuple[int, ...]:
    """Pick ``count`` of the ``free`` queues for one attachment.

    Prefers the lowest run of consecutive ids: multi-queue consumers (QEMU
    ``queues=N``, an RSS context) are happiest on a contiguous range, and
    lowest-first keeps the choice deterministic. Falls back to the lowest ids.
    """
    ordered = sorted(set(free))
    if count < 1:
        raise ValueError("count must be >= 1")
    if len(ordered) < count:
        raise PoolExhausted(
            f"queue pool of {master} exhausted",
            f"need {count} free queue(s), {len(ordered)} free of pool {format_pool(pool)}",
        )
    for i in range(len(ordered) - count + 1):
        run = ordered[i : i + count]
        if run[-1] - run[0] == count - 1:
            return tuple(run)
    return tuple(ordered[:count])


def format_pool(pool: Sequence[int]) -> str:
    """``[8, 9, 10, 12]`` -> ``"8-10,12"``: how admins write pools in configs."""
    ids = sorted(set(pool))
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)
