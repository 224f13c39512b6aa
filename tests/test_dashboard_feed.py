"""The belt feed and the batch-usage and cost metrics of a running server (fake runner, no model):
every step recorded with the right cell kinds, the same slot and padding numbers as
``conveyor bench``'s step-log summary, bounded windows, and the cost arithmetic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from test_batching_policies import make
from test_scheduler import req

from conveyor.bench.metrics import summarize_steps
from conveyor.bench.records import samples_from_step_log
from conveyor.metrics.belt import DECODE, PADDING, PREFILL, BeltFeed, tenant_shares, usage_of
from conveyor.metrics.belt_collector import cost_summary
from conveyor.metrics.prometheus import ServingMetrics
from conveyor.metrics.windows import RecentOutputs, TimeWindow, cost_per_million
from conveyor.server.dashboard import belt_json


def _run_with_feed(core, feed, max_steps=1000):
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            break
        t0 = core.clock()
        out = core.step()
        feed.on_step(SimpleNamespace(last_step_stats=out.stats), t0, t0 + 0.01)
    core.check_invariants()


def test_static_batch_padding_matches_the_bench_summary():
    core, _ = make("static", max_seqs=3, timeout=0.0)
    for rid, prompt_len, max_tokens in (("a", 4, 1), ("b", 2, 5), ("c", 3, 2), ("late", 3, 2)):
        core.add_request(req(rid, prompt_len, max_tokens, arrival=100.0))
    feed = BeltFeed(clock=core.clock)
    _run_with_feed(core, feed)
    records = feed.belt()
    assert len(records) == len(core.step_log) == feed.totals.num_steps
    # step 0 prefills a, b, c; at step 2 a and c (finished) hold their slots as padding
    assert sorted(k for _, _, k in records[0].cells) == [PREFILL] * 3
    kinds = {rid: kind for _, rid, kind in records[2].cells}
    assert kinds == {"a": PADDING, "b": DECODE, "c": PADDING}
    reference = summarize_steps(samples_from_step_log(core.step_log, 0.0, 3))
    usage = usage_of(feed.window(core.clock())[0])
    assert usage["slot_utilization"] == pytest.approx(reference.slot_utilization)
    assert usage["held_idle_slot_steps"] == reference.straggler_slot_steps > 0
    assert usage["empty_slot_steps"] == reference.empty_slot_steps
    assert feed.totals.padding_tokens == reference.padding_tokens > 0
    assert usage["padding_waste"] == pytest.approx(1 - reference.useful_token_fraction)
    t = feed.totals
    assert sum(t.slot_steps.values()) == 3 * t.num_steps


def test_continuous_belt_shows_chunks_decodes_joins_and_tenants():
    core, _ = make("continuous", max_seqs=2, budget=4)
    core.add_request(req("long", 10, 3, arrival=100.0))
    core.add_request(req("short", 2, 2, arrival=100.0))
    core.scheduler.requests["long"].tenant = "A"
    core.scheduler.requests["short"].tenant = "B"
    feed = BeltFeed(clock=core.clock)
    _run_with_feed(core, feed)
    by_rid: dict[str, list[str]] = {}
    for record in feed.belt():
        for _, rid, kind in record.cells:
            by_rid.setdefault(rid, []).append(kind)
    # a 10-token prompt under a 4-token budget takes several prefill chunks, then decodes
    assert by_rid["long"][0] == PREFILL and by_rid["long"].count(PREFILL) >= 3
    assert by_rid["long"][-1] == DECODE and by_rid["long"].count(DECODE) == 2
    belt = belt_json(feed.belt(), feed.num_slots)
    assert belt["num_slots"] == 2 and set(belt["requests"]) == {"long", "short"}
    cells = [cell for s in belt["steps"] for cell in s["cells"]]
    assert all(0 <= slot < 2 and kind in (0, 1, 2) for slot, _, kind in cells)
    assert [r.step_index for r in feed.belt(after_step=2)] == list(range(3, feed.totals.num_steps))
    shares = tenant_shares(feed.window(core.clock())[0])
    assert {s["tenant"] for s in shares} == {"A", "B"}
    assert sum(s["share"] for s in shares) == pytest.approx(1.0)


def test_one_minute_sums_come_from_one_second_buckets():
    feed = BeltFeed(clock=lambda: 0.0)
    engine_core, _ = make("continuous", max_seqs=2)
    for t, rid in ((10.2, "a"), (10.7, "b"), (40.5, "c"), (70.1, "d")):
        engine_core.add_request(req(rid, 3, 1, arrival=100.0))
        out = engine_core.step()                 # one 3-token prefill, finished
        feed.on_step(SimpleNamespace(last_step_stats=out.stats), t - 0.1, t)
    engine_core.check_invariants()
    minute, covered = feed.window(70.5)          # seconds 11..70: the steps at 40.5 and 70.1
    assert minute.num_steps == 2 and covered == pytest.approx(59.5)
    recent, covered = feed.window(70.5, span_s=5)
    assert recent.num_steps == 1 and covered == pytest.approx(4.5)
    assert recent.prefill_tokens == 3 and minute.prefill_tokens == 6
    assert feed.totals.num_steps == 4 and len(feed.belt()) == 4


def test_time_window_forgets_old_samples_and_stays_bounded():
    w = TimeWindow(span_s=10.0, max_samples=3)
    for t, v in ((0.0, 1), (5.0, 2), (9.0, 3), (12.0, 4)):
        w.add(t, v)
    assert w.values(12.0) == [2, 3, 4]                      # bounded: the oldest went first
    assert w.values(16.0) == [3, 4] and w.total(16.0, span_s=5.0) == 4
    assert w.values(100.0) == []


def test_cost_per_million_tokens():
    assert cost_per_million(3.6, 1000.0, 1_000_000) == pytest.approx(1.0)   # $1 of machine
    assert cost_per_million(2.0, 1800.0, 500) == pytest.approx(2000.0)
    assert cost_per_million(None, 10.0, 10) is None
    assert cost_per_million(2.0, 10.0, 0) is None


def test_cost_summary_over_the_last_minute_and_since_start():
    recent = RecentOutputs()
    recent.first_token(100.0, 0.1, num_prompt_tokens=300)
    recent.generated(100.0, 100)
    recent.generated(190.0, 200)
    cost = cost_summary(recent, started=40.0, price_per_hour=36.0, now=200.0)
    # the last minute: $36/h x 60 s = $0.60 for 200 output tokens (the rest are older)
    assert cost["1m"]["output"] == pytest.approx(0.6 / 200 * 1e6)
    assert cost["1m"]["total"] == pytest.approx(0.6 / 200 * 1e6)
    # since start: 160 s = $1.60 for 300 output and 600 total tokens
    assert cost["since_start"]["output"] == pytest.approx(1.6 / 300 * 1e6)
    assert cost["since_start"]["total"] == pytest.approx(1.6 / 600 * 1e6)
    assert cost_summary(recent, 40.0, None, 200.0)["1m"]["output"] is None


def _sample(text: str, name: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ") or
               ln.startswith(name + "{") and not ln.startswith("#")]
    return float(line.rsplit(" ", 1)[1])


def test_metrics_expose_slot_steps_padding_and_cost():
    core, _ = make("static", max_seqs=3, timeout=0.0)
    for rid, prompt_len, max_tokens in (("a", 4, 1), ("b", 2, 5), ("c", 3, 2)):
        core.add_request(req(rid, prompt_len, max_tokens, arrival=100.0))
    metrics = ServingMetrics(lambda: None, price_per_hour=7.2)
    metrics.belt.clock, metrics.belt.started = core.clock, core.clock()
    _run_with_feed(core, metrics.belt)
    metrics.recent.generated(core.clock(), 8)
    text = metrics.render().decode()
    t = metrics.belt.totals
    assert _sample(text, "conveyor:batch_steps_total") == t.num_steps
    assert _sample(text, 'conveyor:batch_slot_steps_total{state="held_idle"}') == \
        t.slot_steps["held_idle"] > 0
    assert _sample(text, "conveyor:padding_tokens_total") == t.padding_tokens > 0
    assert _sample(text, "conveyor:slot_utilization") == pytest.approx(
        t.slot_steps["useful"] / (3 * t.num_steps))
    assert _sample(text, "conveyor:price_per_hour_usd") == 7.2
    # the feed started at the fake clock's 100.0 and it is still 100.0: no elapsed time yet
    assert "cost_per_million_tokens_usd{" not in text
    metrics.belt.clock = lambda: 110.0
    text = metrics.render().decode()
    cost = _sample(text, 'conveyor:cost_per_million_tokens_usd{tokens="output",window="1m"}')
    assert cost == pytest.approx(7.2 * 10 / 3600 / 8 * 1e6)


def test_a_window_nobody_reads_holds_only_its_span():
    window = TimeWindow(span_s=10.0, max_samples=100_000)
    for i in range(5000):
        window.add(i * 0.1, 1.0)              # 500 s of samples, never read
    assert len(window._samples) == 101        # the last 10 s (both ends included)
    assert window.total(499.9) == 101.0
