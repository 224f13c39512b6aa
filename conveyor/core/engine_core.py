"""``EngineCore.step()``: schedule -> execute -> update, over token ids only.

The core owns requests, the scheduler and the KV block bookkeeping; the model runner it drives
is anything with ``execute(SchedulerOutput) -> ModelRunnerOutput`` (the real one lives in
``conveyor.runner``; tests pass fakes). No torch here. Structured outputs: a request whose
grammar is still compiling waits in ``grammar_wait`` (``core.grammar_wait``) until a step finds
it ready; each step's ``SchedulerOutput.grammar`` holds the bitmask of the constrained requests
that sample in it. A request the runner reports as failed
(``ModelRunnerOutput.failed``) finishes with "error" in that step, its blocks uncached and freed;
the step and every other request go on.

The boundary: ``step()`` and ``finish_requests()`` return data only (``EngineCoreOutputs``:
``EngineCoreOutput`` objects stamped with each request's timings and counts, plus the step's
``StepStats``), and ``stats()`` is the typed occupancy snapshot (``EngineStats``); nothing
outside ``core/`` and ``conveyor.engine`` reads the scheduler, the KV manager or the pool.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from conveyor.config import SchedulerConfig, SpeculativeConfig
from conveyor.core.batch_scheduler import BatchScheduler
from conveyor.core.block_pool import BlockPool
from conveyor.core.grammar_wait import GrammarWaitQueue, grammar_bitmask
from conveyor.core.kv_cache_manager import KVCacheManager
from conveyor.core.kv_events import KVEvent, KVEventLog
from conveyor.core.outputs import (EngineCoreOutput, EngineCoreOutputs, ModelRunnerOutput,
                                   SchedulerOutput, StepStats)
from conveyor.core.request import FinishReason, Request
from conveyor.core.scheduler import Scheduler
from conveyor.core.stats import EngineStats, collect_stats
from conveyor.core.spec_policy import SpecPolicy
from conveyor.core.swap import SwapManager
from conveyor.errors import CapacityError, InvalidRequestError


logger = logging.getLogger("conveyor")


class Executor(Protocol):
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...


class EngineCore:
    """One engine: requests in, per-step token deltas out."""

    def __init__(self, executor: Executor, scheduler_config: SchedulerConfig, num_blocks: int,
                 block_size: int, max_model_len: int, clock=time.monotonic,
                 kv_allocation: str = "paged", record_steps: bool = False,
                 enable_prefix_caching: bool = False, swap: SwapManager | None = None,
                 isolate_tenants: bool = True, speculative: SpeculativeConfig | None = None,
                 record_kv_events: bool = False):
        """record_steps: keep a ``StepStats`` per executed step in ``step_log`` (benchmarks);
        isolate_tenants: the prefix cache is per tenant (see ``KVCacheManager``); speculative:
        speculative decoding (the runner must propose drafts), adaptive on measured step costs;
        record_kv_events: log prefix-cache changes for ``take_kv_events`` (``core.kv_events``)."""
        self.executor = executor
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.clock = clock
        self.kv_events = KVEventLog() if record_kv_events else None
        self.kv_manager = KVCacheManager(BlockPool(num_blocks, self.kv_events), block_size,
                                         reserve_full=kv_allocation == "reservation",
                                         enable_prefix_caching=enable_prefix_caching,
                                         isolate_tenants=isolate_tenants)
        if scheduler_config.batching == "continuous":
            self.scheduler = Scheduler(scheduler_config, self.kv_manager, max_model_len, clock, swap)
        else:
            self.scheduler = BatchScheduler(scheduler_config, self.kv_manager, max_model_len,
                                            scheduler_config.launch_timeout_s, clock)
        # One step-cost fit per engine (``core.step_cost``), fed once per step: the prefill
        # budget's, which adaptive speculation reads too.
        self.step_cost = self.scheduler.prefill.model
        if speculative is not None:
            self.scheduler.spec = SpecPolicy(speculative.num_speculative_tokens,
                                             self.step_cost if speculative.adaptive else None)
        self._iteration_start: float | None = None   # the last step's start, while unobserved
        self.num_steps = 0
        self.step_log: list[StepStats] | None = [] if record_steps else None
        self.grammar_wait = GrammarWaitQueue()   # structured outputs still compiling

    def check_request_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise if a request of this size could never run (it would wait at the queue head
        forever): the context length, the KV pool, the scheduling policy's budget."""
        worst = num_prompt_tokens + max_tokens
        if worst > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"context length {self.max_model_len}; shorten the prompt or lower max_tokens",
                "max_tokens")
        if self.kv_manager.num_blocks_for(worst) > self.kv_manager.pool.num_blocks:
            raise CapacityError(
                f"request needs {self.kv_manager.num_blocks_for(worst)} KV blocks but the cache has "
                f"{self.kv_manager.pool.num_blocks}; raise the KV cache size or lower max_tokens")
        self.scheduler.check_request_fits(num_prompt_tokens)

    def add_request(self, request: Request) -> None:
        """Queue a request; raises if it can never run (so it is not retried forever)."""
        if request.request_id in self.scheduler.requests or request.request_id in self.grammar_wait:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        self.check_request_fits(request.num_prompt_tokens, request.max_tokens)
        if not request.arrival_time:
            request.arrival_time = self.clock()
        if not self.grammar_wait.hold(request, self.clock()):
            self.scheduler.add_request(request)

    def finish_requests(self, request_ids, reason: FinishReason = FinishReason.ABORT,
                        stop_reason: int | str | None = None) -> list[EngineCoreOutput]:
        """Finish requests in any state now (abort, a stop string the front end found, a failed
        sibling); their KV blocks return to the pool in this call, and, when nothing else is left
        to run, the runner drops their state now too. Returns a no-token output per request it
        finished (ids unknown or already finished are skipped)."""
        return [EngineCoreOutput.of_finished(r)
                for r in self.abort_requests(request_ids, reason, stop_reason)]

    def abort_requests(self, request_ids, reason: FinishReason = FinishReason.ABORT,
                       stop_reason: int | str | None = None) -> list[Request]:
        """``finish_requests``, returning the finished ``Request`` objects themselves (for
        ``core/``'s own callers and tests; the front end uses ``finish_requests``)."""
        done = self.grammar_wait.finish(request_ids, reason, self.clock())
        done += self.scheduler.finish_requests(request_ids, reason, stop_reason)
        self._tell_runner_if_idle()
        if not self.has_unfinished_requests():     # idle from here: no sleep in the last step
            self._observe_iteration(self.clock())
        return done

    def stats(self) -> EngineStats:
        """Occupancy now and the cumulative counters (typed, data only)."""
        return collect_stats(self.scheduler, self.kv_manager, self.num_steps)

    def take_kv_events(self) -> list[KVEvent]:
        """The prefix-cache changes since the last call, oldest first (empty when not recorded)."""
        return self.kv_events.take() if self.kv_events is not None else []

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; refused (False) while any request holds KV blocks."""
        return self.kv_manager.reset_prefix_cache()

    def _tell_runner_if_idle(self) -> None:
        """No step follows when nothing is left to run: hand the runner the finished ids now."""
        notice = self.scheduler.idle_output()
        if notice is not None:
            self.executor.execute(notice)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.grammar_wait)

    def step(self) -> EngineCoreOutputs:
        """Run one iteration. Returns the requests that got a token (or finished) this step,
        each stamped with its request's timings and counts, and the step's ``StepStats``."""
        start = self.clock()
        self._observe_iteration(start)
        ready, failed = self.grammar_wait.poll(start)
        for request in ready:
            self.scheduler.add_request(request)
        sched_out = self.scheduler.schedule()
        stats = self.scheduler.last_stats
        if sched_out.is_empty and not sched_out.finished_request_ids:
            return EngineCoreOutputs(failed, stats)
        sched_out.grammar = grammar_bitmask(sched_out, self.scheduler.requests)
        runner_out = self.executor.execute(sched_out)
        failed = failed + self._fail_requests(runner_out.failed)
        live = self.scheduler.requests
        sampled = {rid: live[rid] for rid in runner_out.request_ids if rid in live}
        updated = self.scheduler.update_from_output(sched_out, runner_out)
        for out in updated:
            out.stamp(sampled[out.request_id])
        self._iteration_start = start
        if self.step_log is not None and not sched_out.is_empty:
            stats.step_index, stats.start_time, stats.end_time = self.num_steps, start, self.clock()
            self.step_log.append(stats)
        self.num_steps += 1
        self._tell_runner_if_idle()
        if not self.has_unfinished_requests():     # the caller will idle: observe the step now
            self._observe_iteration(self.clock())
        return EngineCoreOutputs(failed + updated, stats)

    def _observe_iteration(self, now: float) -> None:
        """Feed the step-cost fit the last executed step's whole iteration: from its start to
        ``now``, the next step's start. What a client's inter-token gap holds besides the model
        runner (detokenization, the hand-back, the event loop's share of the GIL, adds and
        aborts between steps) is in that span. A step after which the engine went idle is
        observed at its own end instead, so sleep is never counted as work."""
        if self._iteration_start is not None:
            self.scheduler.observe_step_time(now - self._iteration_start)
            self._iteration_start = None

    def _fail_requests(self, reasons: dict[str, str]) -> list[EngineCoreOutput]:
        """Finish with "error" the requests whose own work failed in the runner (``reasons``:
        request id -> why), before this step's update could register their blocks in the prefix
        cache: their blocks leave the cache (they may hold NaN) and return to the pool now."""
        outputs = []
        for rid, why in reasons.items():
            req = self.scheduler.requests.get(rid)
            if req is None or req.is_finished:
                continue
            logger.warning("request %s failed alone and was finished with an error: %s", rid, why)
            self.kv_manager.uncache(req)
            self.scheduler.finish_requests([rid], FinishReason.ERROR)
            outputs.append(EngineCoreOutput(rid, [], finish_reason=FinishReason.ERROR.value,
                                            error=why).stamp(req))
        return outputs

    def check_invariants(self) -> None:
        """free + held == total (device pool and host swap pool); AssertionError on a leak."""
        self.kv_manager.check_invariant()
        if getattr(self.scheduler, "swap", None) is not None:
            self.scheduler.swap.check_invariant()

