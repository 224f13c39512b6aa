"""Where every request is, for the schedulers: the bookkeeping under ``Scheduler.schedule()``.

Owns the request table, the running list, the waiting ``RequestQueue``, batch slots, the
block copies for the runner's next step, and what the runner must be told. A request is in
exactly one place: waiting (or preempted) in the queue, running, or gone. Every request the
runner ever saw is reported in ``finished_request_ids`` once it finishes, in whatever state it
finished (running, waiting after a preemption, ...), so the runner drops its state and its seeded
generator; ``idle_output`` delivers that report when no step follows. No torch.
"""

from __future__ import annotations

import heapq
import time

from conveyor.config import SchedulerConfig
from conveyor.core.kv_cache_manager import KVCacheManager
from conveyor.core.outputs import SchedulerOutput, StepStats
from conveyor.core.request import FinishReason, Request, RequestStatus
from conveyor.core.request_queue import RequestQueue
from conveyor.core.spec_policy import SpecPolicy
from conveyor.core.step_cost import StepFeatures
from conveyor.core.speculation import SpecDecodeStats, max_drafts
from conveyor.core.swap import SwapManager
from conveyor.errors import InvalidRequestError


class SchedulerState:
    """Request placement shared by the continuous scheduler and the batch baselines."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager, max_model_len: int,
                 clock=time.monotonic, swap: SwapManager | None = None):
        self.config = config
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.clock = clock
        self.requests: dict[str, Request] = {}
        self.waiting = RequestQueue(config.fair_scheduling, config.tenant_weights_dict)
        self.running: list[Request] = []
        self._finished_ids: set[str] = set()     # to tell the runner at the next schedule()
        self._runner_known: set[str] = set()     # requests the runner holds state for
        self._runner_seen: set[str] = set()      # ... or may hold anything for (a generator)
        self.swap = swap
        self._swap_out: list[tuple[int, int]] = []   # copies for the runner at the next step
        self._swap_in: list[tuple[int, int]] = []
        self.num_preemptions_total = 0
        self.num_preemptions_by_mode = {"recompute": 0, "swap": 0}
        self.last_stats = StepStats()
        self.slot_of: dict[str, int] = {}        # batch slot held by each admitted request
        self._free_slots = list(range(config.max_num_seqs))
        self.spec: SpecPolicy | None = None      # speculative decoding on (set by EngineCore)
        self.spec_stats = SpecDecodeStats()
        self._spec_scheduled: dict[str, list[int]] = {}   # drafts scheduled in this step

    def token_budget(self) -> int:
        """Tokens one step may compute under this policy."""
        return self.config.max_num_batched_tokens

    def observe_step_time(self, seconds: float) -> None:
        """The engine measured the last scheduled step (a policy with a cost model uses it)."""

    # ------------------------------------------------------------------ batch slots
    def _take_slot(self, req: Request) -> None:
        self.slot_of[req.request_id] = heapq.heappop(self._free_slots)

    def _release_slot(self, request_id: str) -> None:
        slot = self.slot_of.pop(request_id, None)
        if slot is not None:
            heapq.heappush(self._free_slots, slot)

    # ------------------------------------------------------------------ requests in and out
    def check_request_fits(self, num_prompt_tokens: int) -> None:
        """Raise ``InvalidRequestError`` for a prompt this policy could never schedule."""
        budget = self.token_budget()
        if not self.config.enable_chunked_prefill and num_prompt_tokens > budget:
            raise InvalidRequestError(
                f"the prompt has {num_prompt_tokens} tokens but with --no-chunked-prefill a prompt "
                f"is prefilled in one step of at most --max-num-batched-tokens ({budget}) tokens; "
                "shorten the prompt, raise --max-num-batched-tokens or enable chunked prefill",
                "prompt")

    def add_request(self, request: Request) -> None:
        self.check_request_fits(request.num_prompt_tokens)
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids, reason: FinishReason,
                        stop_reason: int | str | None = None) -> list[Request]:
        """Finish (abort, stop-string) requests in any state; their blocks are freed now."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            req.finish(reason, self.clock(), stop_reason)
            if self.swap is not None:
                self.swap.free(req)
            self._free(req)
            done.append(req)
        return done

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def _free(self, req: Request) -> None:
        """A finished request leaves: blocks back to the pool, slot released, runner told."""
        self.kv.free(req)
        self._release_slot(req.request_id)
        self._forget(req)

    def _forget(self, req: Request) -> None:
        """Gone for good, in any state: the queue and the runner forget it too."""
        self.kv.forget(req)
        if self.spec is not None:
            self.spec.forget(req.request_id)
        self.waiting.finish(req)
        self.requests.pop(req.request_id, None)
        self._runner_known.discard(req.request_id)
        if req.request_id in self._runner_seen:
            self._runner_seen.discard(req.request_id)
            self._finished_ids.add(req.request_id)

    def idle_output(self) -> SchedulerOutput | None:
        """With nothing left to schedule, an empty step that only tells the runner which
        requests finished (so an abort while idle releases their runner state now), or None."""
        if self.has_unfinished_requests() or not self._finished_ids:
            return None
        out = SchedulerOutput([], [], {}, 0, self._finished_ids, set())
        self._finished_ids = set()
        return out

    # ------------------------------------------------------------------ speculative decoding
    def _plan_drafts(self, out: SchedulerOutput) -> dict[str, int]:
        """Drafts the runner should propose after this step, per request that samples in it.
        The next step is priced as this one without its drafts (its requests' chunks, each
        after the tokens it had cached)."""
        if self.spec is None:
            return {}
        limits, contexts, chunks = {}, {}, []
        for rid, n in out.num_scheduled_tokens.items():
            req = self.requests[rid]
            k = len(out.scheduled_spec_tokens.get(rid, ()))
            chunks.append((n - k, req.num_computed_tokens))
            if req.num_computed_tokens + n - k == req.num_tokens:
                limits[rid] = max_drafts(req, self.max_model_len) - 1   # after this step's token
                contexts[rid] = req.num_tokens
        return self.spec.plan(limits, StepFeatures.of(chunks), contexts)

    def _record_acceptance(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        self.spec_stats.record(num_drafts, num_accepted)
        if self.spec is not None:
            self.spec.record(request_id, num_drafts, num_accepted)

    # ------------------------------------------------------------------ checks
    def check_step_invariants(self, out: SchedulerOutput) -> None:
        """Cheap (O(running + scheduled)) consistency checks after every ``schedule()``."""
        assert out.total_num_scheduled_tokens <= self.token_budget(), "token budget exceeded"
        assert len(self.slot_of) <= self.config.max_num_seqs, "more slot holders than slots"
        running_ids = {r.request_id for r in self.running}
        assert len(running_ids) == len(self.running), "a request is in the running list twice"
        assert len(running_ids) <= self.config.max_num_seqs
        for rid in running_ids:
            assert not self.waiting.is_waiting(rid), f"{rid} is both running and waiting"
        for rid in out.num_scheduled_tokens:
            assert rid in running_ids and self.requests[rid].status == RequestStatus.RUNNING
        assert not out.preempted_request_ids & set(out.num_scheduled_tokens), \
            "a request was preempted and scheduled in the same step"
