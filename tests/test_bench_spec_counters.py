"""``conveyor bench serve``'s spec-decode counters from a server's /metrics (conveyor's and
vLLM's names) and their change over a run."""

from __future__ import annotations

from conveyor.bench.offline import spec_delta
from conveyor.bench.server_counters import parse_spec_counters

CONVEYOR = """# TYPE conveyor:spec_decode_num_drafts counter
conveyor:spec_decode_num_drafts_total 10.0
# TYPE conveyor:spec_decode_num_draft_tokens counter
conveyor:spec_decode_num_draft_tokens_total 30.0
# TYPE conveyor:spec_decode_num_accepted_tokens counter
conveyor:spec_decode_num_accepted_tokens_total 18.0
# TYPE conveyor:spec_decode_num_accepted_tokens_per_pos counter
conveyor:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 9.0
conveyor:spec_decode_num_accepted_tokens_per_pos_total{position="2"} 3.0
conveyor:spec_decode_num_accepted_tokens_per_pos_total{position="1"} 6.0
"""

VLLM = """# TYPE vllm:spec_decode_num_drafts counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 4.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="m"} 1.0
# TYPE vllm:spec_decode_num_draft_tokens counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 15.0
# TYPE vllm:spec_decode_num_accepted_tokens counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 7.0
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 5.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="m",position="0"} 1.0
"""


def test_conveyor_names_parse_with_positions_in_order():
    assert parse_spec_counters(CONVEYOR) == (10, 30, 18, [9, 6, 3])


def test_vllm_names_sum_over_engines_and_conveyor_wins():
    assert parse_spec_counters(VLLM) == (5, 15, 7, [6])
    assert parse_spec_counters(VLLM + CONVEYOR) == (10, 30, 18, [9, 6, 3])


def test_no_counters_or_garbage_is_none():
    assert parse_spec_counters("# TYPE x counter\nx_total 1.0\n") is None
    assert parse_spec_counters("not { prometheus") is None


def test_delta_over_a_run():
    before, after = (4, 12, 6, [4, 2]), parse_spec_counters(CONVEYOR)
    d = spec_delta(before, after)
    assert (d["num_drafts"], d["num_draft_tokens"], d["num_accepted_tokens"]) == (6, 18, 12)
    assert d["num_accepted_tokens_per_pos"] == [5, 4, 3]
    assert d["acceptance_rate"] == 12 / 18 and d["mean_accepted_length"] == 3.0
    assert spec_delta(None, after) is None
