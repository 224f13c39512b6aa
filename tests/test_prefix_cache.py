"""Prefix caching: pool mechanics, hit accounting, and outputs identical to caching off."""

from __future__ import annotations

from conftest import run_engine
from conveyor.core.block_pool import BlockPool
from conveyor.core.kv_cache_manager import KVCacheManager
from conveyor.core.request import Request
from conveyor.sampling_params import SamplingParams
from conveyor.engine.llm_engine import LLMEngine


def _req(rid, tokens, salt=""):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4), 4, frozenset(), 1.0,
                   cache_salt=salt)


def _computed(kv, req):
    blocks = kv.get_computed_blocks(req)
    kv.take_computed_blocks(req, blocks)
    kv.allocate_slots(req, req.num_tokens - req.num_computed_tokens)
    req.num_computed_tokens = req.num_tokens
    kv.cache_computed_blocks(req)
    return blocks


def test_hits_are_full_blocks_and_never_the_last_token():
    kv = KVCacheManager(BlockPool(16), 4, enable_prefix_caching=True)
    a = _req("a", range(12))
    assert _computed(kv, a) == []
    b = _req("b", range(12))                         # identical, fully cached prompt
    hits = _computed(kv, b)
    assert len(hits) == 2 and b.num_cached_tokens == 0   # last block left to compute
    assert hits == kv.block_table("a")[:2]
    c = _req("c", list(range(9)) + [99, 98])         # shares 2 full blocks, diverges in the 3rd
    assert len(_computed(kv, c)) == 2
    d = _req("d", range(12), salt="tenant-b")        # another salt never hits
    assert _computed(kv, d) == []
    kv.check_invariant()
    for r in (a, b, c, d):
        kv.free(r)
    kv.check_invariant()
    assert kv.pool.num_free_blocks == 16 and kv.pool.num_cached_free_blocks > 0


def test_freed_cached_blocks_are_evicted_lru_only_when_needed():
    pool = BlockPool(4)
    kv = KVCacheManager(pool, 2, enable_prefix_caching=True)
    a = _req("a", [1, 2, 3, 4, 5])
    _computed(kv, a)
    kv.free(a)
    assert pool.num_free_blocks == 4 and pool.num_cached_free_blocks == 2
    b = _req("b", [1, 2, 3, 4, 9])
    assert len(_computed(kv, b)) == 2                # still cached after being freed
    kv.free(b)
    big = _req("x", range(100, 108))                 # needs all 4 blocks: evicts the cache
    _computed(kv, big)
    assert pool.num_cached_free_blocks == 0 and pool.num_evictions >= 2
    kv.free(big)
    assert _computed(kv, _req("c", [1, 2, 3, 4, 5])) == []
    kv.check_invariant()


SYSTEM = [(31 * j) % 30000 + 50 for j in range(40)]


def _prompts():
    questions = [[(7 * i + 3 * j) % 30000 + 100 for j in range(5 + 3 * i)] for i in range(6)]
    prompts = [SYSTEM + q for q in questions]            # share a 40-token prefix
    prompts.append([(11 * j) % 30000 + 7 for j in range(30)])   # shares nothing
    prompts.append(SYSTEM[:32])                           # fully cached (block-aligned) prompt
    return prompts


def _run(path, prefix, **kw):
    args = dict(model=path, dtype="float32", max_num_seqs=3, max_num_batched_tokens=24,
                num_blocks=40, block_size=8, enable_prefix_caching=prefix)
    args.update(kw)
    engine = LLMEngine.from_kwargs(**args)
    warm = engine.add_request(SYSTEM + [5, 6, 7], SamplingParams(temperature=0, max_tokens=2))
    run_engine(engine)
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
           for p in _prompts()]
    finals = run_engine(engine)
    engine.check_invariants()
    assert engine.core.kv_manager.pool.num_free_blocks == engine.num_kv_blocks
    assert warm
    return [finals[i].outputs[0].token_ids for i in ids], [finals[i].num_cached_tokens for i in ids], engine


def test_outputs_identical_with_and_without_prefix_caching(tiny_llama_dir):
    off, off_cached, _ = _run(tiny_llama_dir, False)
    on, on_cached, engine = _run(tiny_llama_dir, True)
    assert on == off
    assert all(c == 0 for c in off_cached)
    assert on_cached[0] == 40 - 40 % 8 and on_cached[6] == 0     # some hit, some do not
    assert on_cached[7] == 24                                    # fully cached: last block recomputed
    kv = engine.core.kv_manager
    assert kv.num_prefix_hits > 0 and kv.num_prefix_queries > kv.num_prefix_hits


def test_hits_after_preemption_give_identical_outputs(tiny_llama_dir):
    off, _, _ = _run(tiny_llama_dir, False, num_blocks=14, max_num_seqs=4)
    on, _, engine = _run(tiny_llama_dir, True, num_blocks=14, max_num_seqs=4)
    assert engine.core.scheduler.num_preemptions_total > 0
    assert on == off
