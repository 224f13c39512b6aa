"""Token-budget continuous-batching scheduler.

There is no prefill phase and no decode phase. Each step hands out tokens from one budget
(``max_num_batched_tokens``) so that each request's ``num_computed_tokens`` catches up with its
``num_tokens``: a decode is 1 token, a prefill chunk is n, a resumed preempted request is all of it
again. A prefix-cache hit simply starts ``num_computed_tokens`` higher. Running requests are
served first (by priority, then arrival), then waiting ones in the ``RequestQueue``'s order
(priority, arrival; weighted fair queueing across tenants when enabled).

When the pool cannot supply a running request's next blocks, the lowest-priority (then newest)
running request is preempted by recompute (blocks freed, progress reset, back to the waiting
queue); waiting requests are not admitted in a step that preempted that way. A waiting request of
strictly higher priority (or, under fair scheduling, of a tenant below its share) that finds no
slot or no blocks preempts a running one (``slot_reclaim``).

Liveness: ``schedule()`` does a bounded number of iterations (each admits a request that waited
when the step began or preempts one that ran then); a request preempted in a step is never
re-admitted in it, and a request admitted or swapped in during a step is never preempted in it.
Without chunked prefill a prompt is prefilled in one step, so a prompt longer than the budget is
refused at entry (``check_request_fits``); a resumed request longer than the budget is chunked.

Invariants asserted at the end of ``schedule()`` (``SchedulerState.check_step_invariants``):
tokens scheduled <= budget, slot holders <= ``max_num_seqs``, every scheduled request is running,
no request both running and waiting. Request placement and what the runner is told live in
``scheduler_state``.
"""

from __future__ import annotations

from conveyor.core.outputs import (CachedRequestData, ModelRunnerOutput, NewRequestData,
                                   EngineCoreOutput, SchedulerOutput, StepStats)
from conveyor.core.prefill_budget import PrefillPolicy, StepPlan
from conveyor.core.request import Request, RequestStatus, check_stop
from conveyor.core.scheduler_state import SchedulerState
from conveyor.core.slot_reclaim import admission_victim


class Scheduler(SchedulerState):
    """Decides each step's batch and applies each step's sampled tokens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prefill = PrefillPolicy(self.config)   # chunk sizes: time budget, partial prefills

    def observe_step_time(self, seconds: float) -> None:
        self.prefill.observe(seconds)

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}
        preempted: list[Request] = []
        # Highest priority first (then oldest): the last running request is the preemption victim.
        self.running.sort(key=_priority_key)
        plan = self.prefill.begin_step(self.running, len(self.waiting), budget)
        budget = self._schedule_running(budget, num_scheduled, new_blocks, preempted, plan)
        admitted = [] if preempted else self._schedule_waiting(budget, num_scheduled, new_blocks,
                                                               preempted, plan)
        return self._build_output(num_scheduled, new_blocks, preempted, admitted)

    def _schedule_running(self, budget, num_scheduled, new_blocks, preempted,
                          plan: StepPlan) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = plan.cap(req, min(req.num_tokens - req.num_computed_tokens, budget), budget)
            if n == 0:
                i += 1
                continue
            blocks = self.kv.allocate_slots(req, n)
            while blocks is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
                blocks = self.kv.allocate_slots(req, n)
            if blocks is None:
                break
            plan.charge(req, n)
            num_scheduled[req.request_id] = n
            new_blocks[req.request_id] = blocks
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, budget, num_scheduled, new_blocks, preempted,
                          plan: StepPlan) -> list[Request]:
        admitted: list[Request] = []
        admitted_ids: set[str] = set()       # never a victim in this step (nor swapped out)
        preempted_ids: set[str] = set()      # never re-admitted in this step
        # Each pass admits a request that waited when the step began or preempts one that ran
        # then, or ends the loop: the bound holds whatever the queue's order says.
        for _ in range(len(self.waiting) + len(self.running) + 1):
            req = self.waiting.peek()
            if req is None or budget <= 0 or req.request_id in preempted_ids:
                break
            blocks, n = (self._allocate_with_prefix_cache(req, budget, plan) if self._free_slots
                         else (None, -1))
            if blocks is None:
                if n == 0:
                    break        # the step's time or partial-prefill allowance is spent
                victim = admission_victim(req, self.running, admitted_ids, self.waiting,
                                          self.config.max_num_seqs)
                if victim is None:
                    break
                budget += num_scheduled.pop(victim.request_id, 0)
                plan.refund(victim.request_id)
                new_blocks.pop(victim.request_id, None)
                self.running.remove(victim)
                self._preempt(victim)
                preempted.append(victim)
                preempted_ids.add(victim.request_id)
                continue
            plan.charge(req, n)
            self.waiting.pop()
            self._admit(req)
            admitted.append(req)
            admitted_ids.add(req.request_id)
            num_scheduled[req.request_id] = n
            new_blocks[req.request_id] = blocks
            budget -= n
        else:
            raise AssertionError("schedule() exceeded its iteration bound")
        return admitted

    def _allocate_with_prefix_cache(self, req: Request, budget: int,
                                    plan: StepPlan) -> tuple[list[int] | None, int]:
        """Adopt cached prefix blocks, then allocate for the next chunk: (blocks, tokens), or,
        with nothing changed, (None, 0) when the step's plan gives it no tokens and (None, -1)
        when it does not fit the budget rule or the pool."""
        if self.swap is not None and self.swap.is_swapped(req):
            return self._allocate_swapped_in(req, budget, plan)
        hits = self.kv.get_computed_blocks(req)
        self.kv.take_computed_blocks(req, hits)
        remaining = req.num_tokens - req.num_computed_tokens
        # Without chunking a prefill waits for a step with budget for all of it, unless it is
        # longer than any budget (a resumed request: prompt + output): then it is chunked.
        whole = not self.config.enable_chunked_prefill and remaining <= self.token_budget()
        n = plan.cap(req, min(remaining, budget), budget)
        blocks = None
        if n > 0 and (not whole or n == remaining):
            blocks = self.kv.allocate_slots(req, n)
        if blocks is None:
            self.kv.free(req)
            req.num_computed_tokens = 0
            return None, 0 if n == 0 and not whole else -1
        if not req.first_scheduled_time:
            req.num_cached_tokens = req.num_computed_tokens
        self.kv.record_prefix_lookup(req.num_tokens, len(hits) * self.kv.block_size)
        return hits + blocks, n

    def _allocate_swapped_in(self, req: Request, budget: int,
                             plan: StepPlan) -> tuple[list[int] | None, int]:
        n = plan.cap(req, min(req.num_tokens - req.num_computed_tokens, budget), budget)
        if n == 0:
            return None, 0
        blocks = self.kv.allocate_slots(req, n)
        if blocks is None:
            return None, -1
        self._swap_in += self.swap.swap_in(req, blocks)
        return blocks, n

    def _admit(self, req: Request) -> None:
        req.status = RequestStatus.RUNNING
        if not req.first_scheduled_time:
            req.first_scheduled_time = self.clock()
        self.running.append(req)
        self._take_slot(req)

    def _preempt(self, req: Request) -> None:
        table = self.kv.block_table(req.request_id)
        # Swapped blocks keep exactly the computed tokens' KV (never a partly scheduled chunk).
        num_full = self.kv.num_blocks_for(req.num_computed_tokens)
        if self.swap is not None and self.swap.should_swap(req, num_full):
            self._swap_out += self.swap.swap_out(req, table[:num_full])
            self.num_preemptions_by_mode["swap"] += 1
        else:
            req.num_computed_tokens = 0
            self.num_preemptions_by_mode["recompute"] += 1
        self.kv.free(req)
        self._release_slot(req.request_id)
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self._runner_known.discard(req.request_id)     # it comes back as new (seen stays)
        self.waiting.requeue(req)

    def _build_output(self, num_scheduled, new_blocks, preempted, admitted,
                      padding_seq_lens: list[int] | None = None) -> SchedulerOutput:
        new_reqs, cached = [], []
        for req in self.running:
            rid = req.request_id
            if rid not in num_scheduled:
                continue
            if rid in self._runner_known:
                cached.append(CachedRequestData(rid, new_blocks[rid], req.num_computed_tokens))
            else:
                new_reqs.append(NewRequestData(
                    rid, req.prompt_token_ids, list(req.output_token_ids), req.sampling_params,
                    list(self.kv.block_table(rid)), req.num_computed_tokens))
                self._runner_known.add(rid)
                self._runner_seen.add(rid)
        total = sum(num_scheduled.values())
        out = SchedulerOutput(new_reqs, cached, num_scheduled, total, self._finished_ids,
                              {r.request_id for r in preempted}, padding_seq_lens or [],
                              self._swap_out, self._swap_in)
        self._finished_ids, self._swap_out, self._swap_in = set(), [], []
        if self.swap is not None:
            self.swap.end_step()
        self._record_stats(out, admitted, len(preempted))
        self.check_step_invariants(out)
        return out

    def _record_stats(self, out: SchedulerOutput, admitted, num_preempted: int) -> None:
        self.last_stats = StepStats.of_step(out, self.requests, len(self.running),
                                            len(self.waiting), self.config.max_num_seqs,
                                            len(admitted), num_preempted, self.kv.pool.usage,
                                            self.slot_of)
        plan = self.prefill.end_step(out.num_scheduled_tokens, self.requests)
        self.last_stats.target_step_s = plan.target_s
        self.last_stats.prefill_budget_tokens = plan.prefill_budget_tokens
        self.last_stats.predicted_step_s = plan.predicted_s

    # ------------------------------------------------------------------ update
    def update_from_output(self, sched: SchedulerOutput,
                           runner_out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Advance computed tokens, append sampled tokens, finish and free stopped requests."""
        now = self.clock()
        for rid, n in sched.num_scheduled_tokens.items():
            req = self.requests.get(rid)
            if req is not None:
                req.num_computed_tokens += n
                self.kv.cache_computed_blocks(req)
                self.waiting.charge(req.tenant, n)
        outputs = []
        for row, rid in enumerate(runner_out.request_ids):
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue    # finished while this step ran (abort); its token is dropped
            outputs.append(self._append_token(req, row, runner_out, now))
        return outputs

    def _append_token(self, req: Request, row: int, ro: ModelRunnerOutput,
                      now: float) -> EngineCoreOutput:
        token = ro.sampled_token_ids[row]
        req.append_output_token(token)
        if not req.first_token_time:
            req.first_token_time = now
        out = EngineCoreOutput(
            req.request_id, [token],
            None if ro.logprobs is None else [ro.logprobs[row]],
            None if ro.top_logprobs is None else [ro.top_logprobs[row]])
        stop = check_stop(req, self.max_model_len)
        if stop is not None:
            reason, stop_reason = stop
            self.running.remove(req)
            req.finish(reason, now, stop_reason)
            self._free(req)
            out.finish_reason, out.stop_reason = reason.value, stop_reason
        return out


def _priority_key(req: Request) -> tuple[int, float]:
    return req.priority, req.arrival_time
