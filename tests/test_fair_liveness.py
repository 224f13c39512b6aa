"""Fair scheduling is live: every schedule() ends, the freed slot never goes straight back to the
request preempted for it, a newcomer starts level, and random tenant mixes always progress, stay
within a bounded unfairness and finish (fake runner that checks every KV read; no model)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from conveyor.config import SchedulerConfig
from conveyor.core.engine_core import EngineCore
from conveyor.core.request import Request
from conveyor.core.request_queue import RequestQueue
from conveyor.core.slot_reclaim import admission_victim
from conveyor.core.swap import PreemptionCosts, SwapManager
from conveyor.errors import InvalidRequestError
from conveyor.sampling_params import SamplingParams

from kv_checking_runner import KVCheckingRunner


def make_core(max_seqs=2, budget=64, num_blocks=256, block_size=4, weights=None, fair=True,
              preemption="recompute", num_host_blocks=64, chunked=True, prefix_caching=False,
              max_len=512):
    runner = KVCheckingRunner(block_size)
    cfg = SchedulerConfig(budget, max_seqs, chunked, "continuous", None, fair, weights or {})
    swap = None if preemption == "recompute" else SwapManager(
        num_host_blocks, preemption, PreemptionCosts(1e-3, 1e-5))
    core = EngineCore(runner, cfg, num_blocks, block_size, max_len, swap=swap,
                      enable_prefix_caching=prefix_caching)
    return core, runner


def req(rid, prompt_len, max_tokens, arrival, tenant="", priority=0, base=0):
    return Request(str(rid), [base + 1 + i for i in range(prompt_len)],
                   SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens, frozenset(),
                   arrival_time=arrival, priority=priority, tenant=tenant)


def limit_preemptions(core, limit):
    """Fail (instead of hanging) when the scheduler loops preempting; returns the counter."""
    count = [0]
    preempt = core.scheduler._preempt

    def counted(r):
        count[0] += 1
        assert count[0] <= limit, f"more than {limit} preemptions: the scheduler livelocks"
        preempt(r)
    core.scheduler._preempt = counted
    return count


def run_all(core, max_steps=5_000):
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            break
        core.step()
    assert not core.has_unfinished_requests()


def expected_output(r: Request) -> list[int]:
    """What the fake model generates for a request, however it was scheduled."""
    tokens = list(r.prompt_token_ids)
    for _ in range(r.max_tokens):
        tokens.append((sum(tokens) * 31 + len(tokens)) % 1000)
    return tokens[r.num_prompt_tokens:]


def finish_clean(core, runner, reqs):
    run_all(core)
    for r in reqs:
        assert r.output_token_ids == expected_output(r), r.request_id
    core.check_invariants()
    assert core.kv_manager.pool.num_free_blocks == core.kv_manager.pool.num_blocks
    assert runner.held == set()                    # the runner was told of every finish
    assert core.scheduler.waiting.num_tenants == 0  # idle tenants are forgotten


@pytest.mark.parametrize("case", ["returning-tenant", "heavier-tenant-still-running"])
def test_a_fair_share_victim_is_never_readmitted_into_the_slot_it_freed(case):
    # A holds more than its share with nothing waiting; B arrives while every slot is full.
    # Before: A's victim was requeued at a tied virtual time, re-admitted into its own slot and
    # preempted again, forever, inside one schedule().
    if case == "returning-tenant":
        core, runner = make_core(max_seqs=2)
        first = [req("B0", 40, 2, 1.0, "B", base=100)]          # B's history: 42 tokens
    else:
        core, runner = make_core(max_seqs=3, weights={"B": 3.0})
        first = [req("B0", 40, 30, 1.0, "B", base=100)]         # B still runs, vtime > A's
    limit_preemptions(core, 10)
    for r in first:
        core.add_request(r)
    for _ in range(3):
        core.step()
    a = [req("A0", 4, 30, 2.0, "A"), req("A1", 4, 30, 3.0, "A", base=50)]
    for r in a:
        core.add_request(r)
    core.step()
    core.step()
    late = req("B1", 4, 3, 4.0, "B", base=200)
    core.add_request(late)
    core.step()                                                 # used to never return
    last = runner.steps[-1]
    assert "B1" in last.num_scheduled_tokens
    assert last.preempted_request_ids == {"A1"}                 # A's newest, once
    assert not last.preempted_request_ids & set(last.num_scheduled_tokens)
    finish_clean(core, runner, first + a + [late])
    assert core.scheduler.num_preemptions_total == 1            # no churn afterwards


def test_a_tenant_arriving_while_the_others_only_run_starts_level_with_them():
    # Before: B started at virtual time 0 and, banking A's 33 tokens as credit, had its whole
    # backlog served before A's next request.
    core, runner = make_core(max_seqs=2)
    limit_preemptions(core, 10)
    a = [req("A0", 4, 40, 1.0, "A")]
    core.add_request(a[0])
    for _ in range(30):
        core.step()
    queue = core.scheduler.waiting
    b = [req(f"B{i}", 4, 4, 2.0 + i / 10, "B", base=100 * (i + 1)) for i in range(6)]
    core.add_request(b[0])
    assert queue.virtual_time("B") == queue.virtual_time("A") == 33   # 4 + 29 decodes
    for r in b[1:]:
        core.add_request(r)
    more_a = [req(f"A{i}", 4, 4, 2.05 + i / 10, "A", base=1000 * i) for i in range(1, 7)]
    for r in more_a:
        core.add_request(r)
    n = len(runner.steps)
    run_all(core)
    order = [x.request_id[0] for s in runner.steps[n:] for x in s.new_requests]
    assert order[:2] == ["B", "A"]                    # interleaved, not B's backlog first
    finish_clean(core, runner, a + b + more_a)


def test_a_request_swapped_in_is_not_swapped_out_in_the_same_step():
    # Before: X (tenant A, lower virtual time) was swapped in, then chosen as the priority victim
    # of B's urgent request in the same schedule(): its new blocks were swapped out before the
    # swap-in filled them, and it resumed on garbage KV (the runner's KV check catches it).
    core, runner = make_core(max_seqs=2, preemption="swap", num_host_blocks=16)
    limit_preemptions(core, 10)
    b0 = req("B0", 40, 1, 1.0, "B", base=500)
    core.add_request(b0)
    core.step()
    a2, x = req("A2", 8, 20, 2.0, "A", 5), req("X", 8, 20, 3.0, "A", 5, base=50)
    core.add_request(a2)
    core.add_request(x)
    core.step()
    core.step()
    h = req("H", 4, 1, 4.0, "A", 0, base=80)                    # urgent: X is swapped out
    core.add_request(h)
    core.step()
    assert runner.steps[-1].preempted_request_ids == {"X"} and runner.steps[-1].swap_out
    y = req("Y", 4, 3, 5.0, "B", 0, base=90)
    core.add_request(y)
    finish_clean(core, runner, [b0, a2, x, h, y])
    assert x.num_preemptions >= 1


def test_host_blocks_a_swap_in_reads_are_not_handed_to_a_swap_out_of_the_same_step():
    # The runner copies swap-outs first: a host block freed by this step's swap-in and reused by
    # this step's swap-out would be overwritten before it is read.
    swap = SwapManager(4, "swap", PreemptionCosts(1.0, 1e-9))
    x, z = req("x", 16, 1, 1.0), req("z", 8, 1, 1.0)
    x.num_computed_tokens = z.num_computed_tokens = 8
    swap.swap_out(x, [0, 1, 2, 3])
    reads = {h for h, _ in swap.swap_in(x, [4, 5, 6, 7])}
    assert not swap.should_swap(z, 2)                  # no host block is free until the step ends
    swap.check_invariant()
    swap.end_step()
    assert swap.should_swap(z, 2) and {h for _, h in swap.swap_out(z, [8, 9])} <= reads
    swap.check_invariant()


class _AlwaysAhead(RequestQueue):
    def would_serve_before(self, req, victim):
        return True


def test_slot_reclaim_never_picks_a_request_admitted_in_this_step():
    queue = _AlwaysAhead(fair=True)
    running = [req("old", 4, 4, 1.0, "A", 5), req("new", 4, 4, 2.0, "A", 5)]
    urgent = req("u", 4, 4, 3.0, "B", 0)
    assert admission_victim(urgent, running, {"new"}, queue, 2).request_id == "old"
    assert admission_victim(urgent, running, {"new", "old"}, queue, 2) is None


def test_tenant_state_is_bounded_by_tenants_with_work():
    core, runner = make_core(max_seqs=4, budget=64)
    limit_preemptions(core, 0)
    queue = core.scheduler.waiting
    reqs = []
    for wave in range(5):
        for i in range(40):                                     # 200 tenants over time
            r = req(f"{wave}-{i}", 2, 1, 1.0 + wave + i / 100, f"t{wave}-{i}", base=i)
            reqs.append(r)
            core.add_request(r)
        assert queue.num_tenants <= 40 + 4
        run_all(core)
        assert queue.num_tenants == 0 and queue.virtual_time(f"t{wave}-0") is None
    finish_clean(core, runner, reqs)


def test_weighted_shares_of_computed_tokens_while_both_tenants_are_backlogged():
    core, runner = make_core(max_seqs=4, budget=16, weights={"A": 3.0, "B": 1.0})
    limit_preemptions(core, 80)
    reqs = [req(f"{t}{i}", 8, 8, 1.0 + i / 100, t, base=100 * i + (0 if t == "A" else 50))
            for t in "AB" for i in range(40)]
    for r in reqs:
        core.add_request(r)
    tokens = {"A": 0, "B": 0}
    while {r.tenant for r in core.scheduler.waiting} == {"A", "B"}:
        core.step()
        for rid, n in runner.steps[-1].num_scheduled_tokens.items():
            tokens[rid[0]] += n
    share = tokens["A"] / (tokens["A"] + tokens["B"])
    assert 0.70 <= share <= 0.80, tokens                       # weighted share: 0.75
    finish_clean(core, runner, reqs)


# ---------------------------------------------------------------------- property
WEIGHTS = [0.5, 1.0, 2.0, 3.0]

workloads = st.lists(
    st.tuples(st.integers(0, 3), st.integers(1, 24), st.integers(1, 10), st.integers(0, 2),
              st.integers(0, 25)),                  # tenant, prompt, max_tokens, priority, step
    min_size=1, max_size=14)


@settings(max_examples=200, deadline=None)
@given(work=workloads, weights=st.lists(st.sampled_from(WEIGHTS), min_size=4, max_size=4),
       max_seqs=st.integers(1, 4), budget=st.integers(1, 32), block_size=st.sampled_from([1, 2, 4]),
       spare_blocks=st.integers(0, 6), chunked=st.booleans(),
       preemption=st.sampled_from(["recompute", "swap", "auto"]), host_blocks=st.integers(1, 8),
       prefix_caching=st.booleans(), shared_prompts=st.booleans())
def test_property_fair_scheduling_progresses_stays_fair_and_finishes(
        work, weights, max_seqs, budget, block_size, spare_blocks, chunked, preemption,
        host_blocks, prefix_caching, shared_prompts):
    """Unfairness bound. Let V be the least virtual time among backlogged tenants (with waiting
    requests). A backlogged tenant's virtual time exceeds V by at most what its own in-flight
    requests were charged since it was last admitted, and at most ``max_num_seqs`` of its requests
    are in flight: so vtime(t) - V <= max_num_seqs * C / weight(t), C being the most tokens any
    single request was charged (recomputation after preemption included)."""
    worst = max(p + m for _, p, m, _, _ in work)
    num_blocks = -(-worst // block_size) + spare_blocks
    tenant_weights = {f"t{i}": w for i, w in enumerate(weights)}
    core, runner = make_core(max_seqs, budget, num_blocks, block_size, tenant_weights,
                             preemption=preemption, num_host_blocks=host_blocks,
                             chunked=chunked, prefix_caching=prefix_caching, max_len=worst)
    queue = core.scheduler.waiting
    preemptions = limit_preemptions(core, max_seqs)
    pending = sorted(enumerate(work), key=lambda x: x[1][4])
    admitted, charged, step = [], {}, 0
    while pending or core.has_unfinished_requests():
        while pending and pending[0][1][4] <= step:
            i, (t, p, m, prio, _) = pending.pop(0)
            r = req(i, p, m, 1.0 + step + i / 100, f"t{t}", prio, base=0 if shared_prompts else 100 * i)
            if not chunked and p > budget:
                with pytest.raises(InvalidRequestError, match="--max-num-batched-tokens"):
                    core.add_request(r)
                continue
            core.add_request(r)
            admitted.append(r)
        had_work, num_steps = core.has_unfinished_requests(), len(runner.steps)
        preemptions[0] = 0      # a step preempts only requests that ran when it began
        core.step()
        if had_work:        # progress: every step with work computes something
            assert len(runner.steps) > num_steps      # (+ a finished-ids notice when idle)
            out = runner.steps[num_steps]
            assert out.total_num_scheduled_tokens > 0
            for rid, n in out.num_scheduled_tokens.items():
                charged[rid] = charged.get(rid, 0) + n
            backlogged = {r.tenant for r in queue}
            if backlogged:
                floor = min(queue.virtual_time(t) for t in backlogged)
                bound = max_seqs * max(charged.values(), default=0)
                for t in backlogged:
                    assert queue.virtual_time(t) - floor <= bound / tenant_weights[t] + 1e-6
        step += 1
        assert step < 5_000, "no progress"
    finish_clean(core, runner, admitted)
