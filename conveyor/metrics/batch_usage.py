"""How a step used its batch slots: the one definition the server's /metrics, the dashboard and
``conveyor bench`` share.

A step has ``max_num_seqs`` slots. A slot is *useful* when its holder computed real tokens this
step, *held idle* when its holder did nothing useful (a finished member of a static batch waiting
for the longest one: padding), and *empty* when nobody held it. Slot utilization is useful slots
over ``max_num_seqs``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable


def slot_counts(max_num_seqs: int, holder_ids: Iterable[str],
                useful_ids: Collection[str]) -> tuple[int, int, int]:
    """``(useful, held_idle, empty)`` slots of one step; ``useful_ids`` is a set (or any
    collection with fast membership) of the requests that computed real tokens."""
    holders = list(holder_ids)
    held_idle = sum(1 for rid in holders if rid not in useful_ids)
    return len(useful_ids), held_idle, max(0, max_num_seqs - len(holders))
