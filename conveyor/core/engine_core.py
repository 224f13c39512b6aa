"""``EngineCore.step()``: schedule -> execute -> update, over token ids only.

The core owns requests, the scheduler and the KV block bookkeeping; the model runner it drives
is anything with ``execute(SchedulerOutput) -> ModelRunnerOutput`` (the real one lives in
``conveyor.runner``; tests pass fakes). No torch here.
"""

from __future__ import annotations

import time
from typing import Protocol

from conveyor.config import SchedulerConfig
from conveyor.core.batch_scheduler import BatchScheduler
from conveyor.core.block_pool import BlockPool
from conveyor.core.kv_cache_manager import KVCacheManager
from conveyor.core.outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput, StepStats
from conveyor.core.request import FinishReason, Request
from conveyor.core.scheduler import Scheduler
from conveyor.core.swap import SwapManager
from conveyor.errors import CapacityError, InvalidRequestError


class Executor(Protocol):
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...


class EngineCore:
    """One engine: requests in, per-step token deltas out."""

    def __init__(self, executor: Executor, scheduler_config: SchedulerConfig, num_blocks: int,
                 block_size: int, max_model_len: int, clock=time.monotonic,
                 kv_allocation: str = "paged", record_steps: bool = False,
                 enable_prefix_caching: bool = False, swap: SwapManager | None = None):
        """record_steps: keep a ``StepStats`` per executed step in ``step_log`` (benchmarks)."""
        self.executor = executor
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.clock = clock
        self.kv_manager = KVCacheManager(BlockPool(num_blocks), block_size,
                                         reserve_full=kv_allocation == "reservation",
                                         enable_prefix_caching=enable_prefix_caching)
        if scheduler_config.batching == "continuous":
            self.scheduler = Scheduler(scheduler_config, self.kv_manager, max_model_len, clock, swap)
        else:
            self.scheduler = BatchScheduler(scheduler_config, self.kv_manager, max_model_len,
                                            scheduler_config.launch_timeout_s, clock)
        self.num_steps = 0
        self.step_log: list[StepStats] | None = [] if record_steps else None

    def add_request(self, request: Request) -> None:
        """Queue a request; raises if it can never run (so it is not retried forever)."""
        if request.request_id in self.scheduler.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        worst = request.num_prompt_tokens + request.max_tokens
        if worst > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens ({request.max_tokens}) "
                f"exceeds the context length {self.max_model_len}; shorten the prompt or lower "
                "max_tokens", "max_tokens")
        if self.kv_manager.num_blocks_for(worst) > self.kv_manager.pool.num_blocks:
            raise CapacityError(
                f"request needs {self.kv_manager.num_blocks_for(worst)} KV blocks but the cache has "
                f"{self.kv_manager.pool.num_blocks}; raise the KV cache size or lower max_tokens")
        if not request.arrival_time:
            request.arrival_time = self.clock()
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids, reason: FinishReason = FinishReason.ABORT) -> list[Request]:
        """Finish requests in any state now; their KV blocks return to the pool in this call."""
        return self.scheduler.finish_requests(request_ids, reason)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        """Run one iteration. Returns the requests that got a token (or finished) this step."""
        start = self.clock()
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty and not sched_out.finished_request_ids:
            return []
        runner_out = self.executor.execute(sched_out)
        outputs = self.scheduler.update_from_output(sched_out, runner_out)
        if self.step_log is not None and not sched_out.is_empty:
            stats = self.scheduler.last_stats
            stats.step_index, stats.start_time, stats.end_time = self.num_steps, start, self.clock()
            self.step_log.append(stats)
        self.num_steps += 1
        return outputs

    def check_invariants(self) -> None:
        """free + held == total (device pool and host swap pool); AssertionError on a leak."""
        self.kv_manager.check_invariant()
        if getattr(self.scheduler, "swap", None) is not None:
            self.scheduler.swap.check_invariant()
