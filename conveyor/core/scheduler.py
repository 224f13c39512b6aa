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
from conveyor.core.speculation import accept_drafts, history_scope
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
            n, blocks = self._allocate_running(req, n, budget)
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
            self._note_drafts(req, n)
            num_scheduled[req.request_id] = n
            new_blocks[req.request_id] = blocks
            budget -= n
            i += 1
        return budget

    def _allocate_running(self, req: Request, n: int, budget: int) -> tuple[int, list[int] | None]:
        """(tokens, new blocks) for a running request granted ``n`` tokens: for a decode, also the
        drafts it carries as far as budget and pool allow (drafts never cause a preemption);
        blocks None when even its own tokens do not fit."""
        remaining = req.num_tokens - req.num_computed_tokens
        want = min(n + len(req.spec_token_ids), budget) if n == remaining == 1 else n
        blocks = self.kv.allocate_slots(req, want)
        if blocks is None and want > n:
            want, blocks = n, self.kv.allocate_slots(req, n)
        return want, blocks

    def _note_drafts(self, req: Request, n: int) -> None:
        num_drafts = n - (req.num_tokens - req.num_computed_tokens)
        if num_drafts > 0:
            self._spec_scheduled[req.request_id] = req.spec_token_ids[:num_drafts]

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
        req.spec_token_ids = []                          # drafts are dropped, never resumed
        self._spec_scheduled.pop(req.request_id, None)
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
                    list(self.kv.block_table(rid)), req.num_computed_tokens,
                    history_scope(req, self.kv.isolate_tenants)))
                self._runner_known.add(rid)
                self._runner_seen.add(rid)
        total = sum(num_scheduled.values())
        out = SchedulerOutput(new_reqs, cached, num_scheduled, total, self._finished_ids,
                              {r.request_id for r in preempted}, padding_seq_lens or [],
                              self._swap_out, self._swap_in, None, self._spec_scheduled)
        out.num_drafts_to_propose = self._plan_drafts(out)
        self._finished_ids, self._swap_out, self._swap_in = set(), [], []
        self._spec_scheduled = {}
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
        """Advance computed tokens, append sampled tokens (accepted drafts first), take the next
        drafts, finish and free stopped requests."""
        now = self.clock()
        for rid, n in sched.num_scheduled_tokens.items():
            req = self.requests.get(rid)
            if req is not None:
                # scheduled drafts count once accepted (in _append_tokens): rejected ones roll back
                req.num_computed_tokens += n - len(sched.scheduled_spec_tokens.get(rid, ()))
                req.spec_token_ids = []
                self.kv.cache_computed_blocks(req)
                self.waiting.charge(req.tenant, n)
        outputs = []
        for rid, rows in _rows_by_request(runner_out.request_ids):
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue    # finished while this step ran (abort); its tokens are dropped
            drafts = sched.scheduled_spec_tokens.get(rid)
            if drafts:
                self._record_acceptance(rid, len(drafts), len(rows) - 1)
            outputs.append(self._append_tokens(req, rows, runner_out, now))
            if not req.is_finished and rid in runner_out.draft_token_ids:
                req.spec_token_ids = accept_drafts(req, runner_out.draft_token_ids[rid],
                                                   self.max_model_len)
        return outputs

    def _append_tokens(self, req: Request, rows: list[int], ro: ModelRunnerOutput,
                       now: float) -> EngineCoreOutput:
        out = EngineCoreOutput(req.request_id, [],
                               None if ro.logprobs is None else [],
                               None if ro.top_logprobs is None else [])
        for j, row in enumerate(rows):
            if j:   # the previous token was an accepted draft: its KV is computed
                req.num_computed_tokens += 1
                self.kv.cache_computed_blocks(req)
            token = ro.sampled_token_ids[row]
            req.append_output_token(token)
            out.new_token_ids.append(token)
            if ro.logprobs is not None:
                out.new_logprobs.append(ro.logprobs[row])
            if ro.top_logprobs is not None:
                out.new_top_logprobs.append(ro.top_logprobs[row])
            if self._stop(req, out, now):
                break
        if not req.first_token_time:
            req.first_token_time = now
        return out

    def _stop(self, req: Request, out: EngineCoreOutput, now: float) -> bool:
        stop = check_stop(req, self.max_model_len)
        if stop is None:
            return False
        reason, stop_reason = stop
        self.running.remove(req)
        req.finish(reason, now, stop_reason)
        self._free(req)
        out.finish_reason, out.stop_reason = reason.value, stop_reason
        return True


def _rows_by_request(request_ids: list[str]) -> list[tuple[str, list[int]]]:
    """Consecutive rows of the same request, grouped: [(request id, its row indices)]."""
    groups: list[tuple[str, list[int]]] = []
    for row, rid in enumerate(request_ids):
        if groups and groups[-1][0] == rid:
            groups[-1][1].append(row)
        else:
            groups.append((rid, [row]))
    return groups


def _priority_key(req: Request) -> tuple[int, float]:
    return req.priority, req.arrival_time
