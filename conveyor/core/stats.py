"""``EngineStats``: a typed, data-only snapshot of one engine's scheduler and KV cache.

The one way anything outside ``core/`` and ``conveyor.engine`` learns how full the engine is
(metrics gauges, ``/health``, the serving log line, benchmarks' counters): built by
``EngineCore.stats()`` from the scheduler, the KV manager and the block pool, read-only, and
made of ints, floats and tuples only, so it can cross a process boundary as it is. Counters
(``num_preemptions_total``, ``prefix_cache_*``, ``num_steps``) are cumulative over the engine's
life; a benchmark reports their change over a run.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.core.prefill_budget import StepCostSnapshot


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Scheduler and KV-cache occupancy now, and the engine's cumulative counters."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions_total: int = 0
    num_cached_free_blocks: int = 0      # free blocks still holding a cached prefix (evictable)
    prefix_cache_queries: int = 0        # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0           # of which found cached
    preemptions_by_mode: tuple[tuple[str, int], ...] = ()
    num_steps: int = 0                   # steps that ran the model
    last_step_num_scheduled_tokens: int = 0   # tokens the latest schedule() computed (0: none)
    step_cost: StepCostSnapshot | None = None  # the step-cost model and prefill budget
    # speculative decoding (None when off): (num_drafts, num_draft_tokens, num_accepted_tokens,
    # accepted tokens per draft position), cumulative
    spec_decode: tuple[int, int, int, tuple[int, ...]] | None = None

    @property
    def preemptions(self) -> dict[str, int]:
        """``preemptions_by_mode`` as a dict (mode -> count)."""
        return dict(self.preemptions_by_mode)


def collect_stats(scheduler, kv_manager, num_steps: int) -> EngineStats:
    """The snapshot of a scheduler (continuous or batch) and its KV manager, now."""
    pool = kv_manager.pool
    return EngineStats(len(scheduler.running), len(scheduler.waiting), pool.num_free_blocks,
                       pool.num_blocks, pool.usage, scheduler.num_preemptions_total,
                       pool.num_cached_free_blocks, kv_manager.num_prefix_queries,
                       kv_manager.num_prefix_hits,
                       tuple(sorted(scheduler.num_preemptions_by_mode.items())), num_steps,
                       scheduler.last_stats.num_scheduled_tokens, _step_cost(scheduler),
                       _spec_counts(scheduler))


def _step_cost(scheduler) -> StepCostSnapshot | None:
    """The continuous scheduler's cost model and budget (the batch baselines have none)."""
    prefill = getattr(scheduler, "prefill", None)
    return prefill.snapshot() if prefill is not None else None


def _spec_counts(scheduler) -> tuple[int, int, int, tuple[int, ...]] | None:
    if getattr(scheduler, "spec", None) is None:
        return None
    st = scheduler.spec_stats
    return (st.num_drafts, st.num_draft_tokens, st.num_accepted_tokens,
            tuple(st.accepted_per_position))
