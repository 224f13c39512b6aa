"""Structured outputs without a model: the spec, the compile service, the engine core's grammar
wait queue and bitmask plumbing (fake runner, fake grammars), and the sampler's masking."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import numpy as np
import pytest
import torch

from conveyor.config import SchedulerConfig
from conveyor.core.engine_core import EngineCore
from conveyor.core.outputs import ModelRunnerOutput, SchedulerOutput
from conveyor.core.request import FinishReason, Request
from conveyor.core.swap import PreemptionCosts, SwapManager
from conveyor.errors import InvalidRequestError
from conveyor.sampling import Sampler, SamplingMetadata
from conveyor.sampling.constraints import GrammarMask, unpack_bitmask
from conveyor.sampling_params import SamplingParams
from conveyor.structured import StructuredOutputsParams
from conveyor.structured.backend import allocate_bitmask
from conveyor.structured.compile_service import CompileService
from conveyor.structured.request_state import StructuredRequest

from fake_runner import FakeRunner

VOCAB = 64


# ---------------------------------------------------------------- fakes
class SequenceMatcher:
    """Allows exactly ``tokens`` in order, then terminates (or only EOS when ``eos`` is set)."""

    def __init__(self, tokens):
        self.tokens, self.pos = list(tokens), 0

    def fill_bitmask(self, bitmask, row):
        bitmask[row] = 0
        t = self.tokens[self.pos]
        bitmask[row, t // 32] = np.int32(np.uint32(1 << (t % 32)).view(np.int32))

    def accept(self, token):
        if self.pos >= len(self.tokens) or token != self.tokens[self.pos]:
            return False
        self.pos += 1
        return True

    def is_terminated(self):
        return self.pos == len(self.tokens)

    def rollback(self, n):
        self.pos -= n

    def reset(self):
        self.pos = 0


class SequenceGrammar:
    def __init__(self, tokens):
        self.tokens = tokens

    def matcher(self):
        return SequenceMatcher(self.tokens)


class MaskHonouringRunner(FakeRunner):
    """FakeRunner whose constrained rows take their lowest allowed token; records every step's
    grammar rows and which requests sampled."""

    def __init__(self, block_size):
        super().__init__(block_size, vocab=VOCAB)
        self.grammar_rows: list[tuple[list[str], list[str]]] = []

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        out = super().execute(sched)
        if sched.grammar is None:
            return out
        self.grammar_rows.append((list(sched.grammar.request_ids), list(out.request_ids)))
        for rid, row in zip(sched.grammar.request_ids, sched.grammar.bitmask):
            i = out.request_ids.index(rid)
            allowed = np.unpackbits(row.view(np.uint8), bitorder="little")
            token = int(np.flatnonzero(allowed)[0])
            self.state[rid]["tokens"][-1] = token
            out.sampled_token_ids[i] = token
        return out


def make_core(num_blocks=64, block_size=4, budget=32, max_seqs=4, clock=None,
              preemption="recompute"):
    runner = MaskHonouringRunner(block_size)
    kw = {} if clock is None else {"clock": clock}
    if preemption != "recompute":
        kw["swap"] = SwapManager(num_blocks, preemption, PreemptionCosts(1e-3, 1e-5))
    core = EngineCore(runner, SchedulerConfig(budget, max_seqs, True, "continuous", 0.0),
                      num_blocks, block_size, 256, **kw)
    return core, runner


def done_future(value=None, exc=None):
    f = concurrent.futures.Future()
    f.set_exception(exc) if exc is not None else f.set_result(value)
    return f


SPEC = StructuredOutputsParams(regex="x")


def constrained(rid, prompt_len, max_tokens, future, deadline=1e9, **kw):
    params = SamplingParams(max_tokens=max_tokens, structured_outputs=SPEC, **kw)
    return Request(str(rid), list(range(1, prompt_len + 1)), params, max_tokens, frozenset(),
                   arrival_time=1.0,
                   structured=StructuredRequest(SPEC, future, deadline, VOCAB, 5.0))


def plain(rid, prompt_len, max_tokens):
    return Request(str(rid), list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
                   max_tokens, frozenset(), arrival_time=1.0)


def run_all(core, max_steps=2000):
    outs, finals = {}, {}
    for _ in range(max_steps):
        if not core.has_unfinished_requests():
            break
        for o in core.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason is not None:
                finals[o.request_id] = o
    assert not core.has_unfinished_requests()
    core.check_invariants()
    assert core.kv_manager.pool.num_free_blocks == core.kv_manager.pool.num_blocks
    return outs, finals


# ---------------------------------------------------------------- the spec
def test_spec_takes_exactly_one_constraint_and_names_the_field():
    with pytest.raises(InvalidRequestError) as e:
        StructuredOutputsParams()
    assert e.value.param == "structured_outputs"
    with pytest.raises(InvalidRequestError, match="regex, choice"):
        StructuredOutputsParams(regex="a", choice=["a"])
    for kw, field in ((dict(json="{not json"), "json"), (dict(json=[1]), "json"),
                      (dict(choice=[]), "choice"), (dict(choice=["a", 3]), "choice"),
                      (dict(regex=""), "regex"), (dict(grammar=5), "grammar"),
                      (dict(json_object=False), "json_object"),
                      (dict(structural_tag={"structures": [], "triggers": ["<f"]}),
                       "structural_tag")):
        with pytest.raises(InvalidRequestError) as e:
            StructuredOutputsParams(**kw)
        assert e.value.param == f"structured_outputs.{field}", kw
    with pytest.raises(InvalidRequestError) as e:
        StructuredOutputsParams(json="[]", field_name="response_format.json_schema.schema")
    assert e.value.param == "response_format.json_schema.schema"


def test_spec_key_is_stable_and_order_sensitive():
    a = StructuredOutputsParams(json={"type": "object", "properties": {"a": {}, "b": {}}})
    b = StructuredOutputsParams(json='{"type": "object", "properties": {"a": {}, "b": {}}}')
    c = StructuredOutputsParams(json={"type": "object", "properties": {"b": {}, "a": {}}})
    assert a.key() == b.key() and a == b and hash(a) == hash(b)
    assert a.key() != c.key()          # property order is generation order
    assert StructuredOutputsParams(choice=["x", "y"]).key() != StructuredOutputsParams(
        regex="x|y").key()
    schema = {"type": "object"}
    d = StructuredOutputsParams(json=schema)
    schema["type"] = "array"           # the caller's dict is not the spec's
    assert d.json == {"type": "object"}


def test_sampling_params_check_logit_bias():
    assert SamplingParams(logit_bias={3: 100, 4: -100.0}).logit_bias == {3: 100.0, 4: -100.0}
    for bad in ({-1: 1.0}, {True: 1.0}, {"3": 1.0}, {3: 100.5}, {3: float("nan")},
                {3: float("inf")}, {i: 1.0 for i in range(301)}, [1, 2]):
        with pytest.raises(InvalidRequestError) as e:
            SamplingParams(logit_bias=bad)
        assert e.value.param == "logit_bias"


# ---------------------------------------------------------------- the compile service
class CountingBackend:
    name = "fake"

    def __init__(self, gate: threading.Event | None = None):
        self.compiled = []
        self.gate = gate

    def compile(self, spec):
        if self.gate is not None:
            self.gate.wait(10)
        self.compiled.append(spec.key())
        if spec.regex == "bad":
            raise InvalidRequestError(f"{spec.param} does not compile", spec.param)
        return SequenceGrammar([1])


def test_compile_cache_hits_and_evicts_least_recently_used():
    backend = CountingBackend()
    service = CompileService(backend, cache_size=2)
    a, b, c = (StructuredOutputsParams(regex=r) for r in ("a", "b", "c"))
    fa = service.submit(a)
    assert service.submit(StructuredOutputsParams(regex="a")) is fa      # same key: a hit
    fa.result(5)
    service.submit(b).result(5)
    service.submit(a)                                                   # a is now the newest
    service.submit(c).result(5)                                         # evicts b
    service.submit(a).result(5)
    service.submit(b).result(5)                                         # compiled again
    assert backend.compiled.count(a.key()) == 1 and backend.compiled.count(b.key()) == 2
    assert service.num_hits == 3 and service.num_misses == 4
    bad = service.submit(StructuredOutputsParams(regex="bad"))
    with pytest.raises(InvalidRequestError):
        bad.result(5)
    assert service.submit(StructuredOutputsParams(regex="bad")) is bad  # failures fail fast
    service.close()


def test_compile_timeout_is_a_400_and_the_engine_side_fails_the_request():
    gate = threading.Event()
    service = CompileService(CountingBackend(gate), timeout_s=0.05)
    spec = StructuredOutputsParams(regex="slow")
    with pytest.raises(InvalidRequestError, match="longer than 0.05 s") as e:
        asyncio.run(service.await_grammar(spec))
    assert e.value.param == "structured_outputs.regex"
    state = StructuredRequest(spec, service.submit(spec), deadline=10.0, vocab_size=VOCAB,
                              timeout_s=0.05)
    assert state.poll(9.0).value == "compiling"
    assert state.poll(10.0).value == "failed" and "longer than" in state.error
    gate.set()
    assert isinstance(service.submit(spec).result(5), SequenceGrammar)  # kept for later requests
    service.close()


# ---------------------------------------------------------------- the engine core
@pytest.mark.parametrize("num_blocks,budget,preemption", [(64, 32, "recompute"),
                                                         (12, 8, "recompute"), (12, 8, "swap")])
def test_constrained_rows_get_masks_only_when_they_sample(num_blocks, budget, preemption):
    # (12 blocks, budget 8): chunked prefill and preemption (recompute or swap) on the way
    core, runner = make_core(num_blocks=num_blocks, budget=budget, preemption=preemption)
    seq = [5, 6, 7, 8, 9, 10]
    core.add_request(constrained("c", 10, 20, done_future(SequenceGrammar(seq))))
    for i in range(3):
        core.add_request(plain(i, 9 + i, 8))
    outs, finals = run_all(core)
    assert outs["c"] == seq                                  # the grammar, then stop
    assert finals["c"].finish_reason == "stop"
    assert all(finals[str(i)].finish_reason == "length" for i in range(3))
    for grammar_ids, sampled_ids in runner.grammar_rows:
        assert grammar_ids == ["c"] and "c" in sampled_ids
    assert len(runner.grammar_rows) == len(seq)              # never on a partial prefill chunk
    if num_blocks == 12:
        assert core.scheduler.num_preemptions_by_mode[preemption] > 0


def test_request_waits_for_its_grammar_without_blocking_others():
    core, _ = make_core()
    pending = concurrent.futures.Future()
    core.add_request(constrained("c", 6, 10, pending))
    core.add_request(plain("p", 6, 4))
    for _ in range(10):
        core.step()
    assert "c" in core.grammar_wait and core.has_unfinished_requests()
    assert "p" not in core.scheduler.requests                # finished meanwhile
    assert core.kv_manager.pool.num_free_blocks == core.kv_manager.pool.num_blocks
    pending.set_result(SequenceGrammar([3, 4]))
    outs, finals = run_all(core)
    assert outs["c"] == [3, 4] and finals["c"].finish_reason == "stop"


def test_compile_failure_or_timeout_finishes_with_an_error_and_abort_works_while_waiting():
    now = [100.0]
    core, _ = make_core(clock=lambda: now[0])
    bad = concurrent.futures.Future()
    core.add_request(constrained("bad", 6, 10, bad))
    core.add_request(constrained("slow", 6, 10, concurrent.futures.Future(), deadline=105.0))
    core.add_request(constrained("gone", 6, 10, concurrent.futures.Future()))
    gone = core.abort_requests(["gone"])
    assert [r.request_id for r in gone] == ["gone"] and gone[0].finish_reason == FinishReason.ABORT
    bad.set_exception(InvalidRequestError("structured_outputs.regex does not compile", "x"))
    first = core.step()
    assert [(o.request_id, o.finish_reason) for o in first] == [("bad", "error")]
    assert "does not compile" in first[0].error
    now[0] = 105.0
    second = core.step()
    assert [(o.request_id, o.finish_reason) for o in second] == [("slow", "error")]
    assert "longer than" in second[0].error and not core.has_unfinished_requests()
    core.check_invariants()


def test_known_compile_failure_is_refused_at_add_and_matchers_are_released_on_finish():
    core, _ = make_core()
    failed = done_future(exc=InvalidRequestError("structured_outputs.regex does not compile"))
    with pytest.raises(InvalidRequestError, match="does not compile"):
        core.add_request(constrained("x", 6, 10, failed))
    running = constrained("r", 6, 50, done_future(SequenceGrammar(list(range(1, 40)))))
    waiting = constrained("w", 6, 50, concurrent.futures.Future())
    core.add_request(running)
    core.add_request(waiting)
    for _ in range(4):
        core.step()
    assert running.structured.matcher is not None
    core.abort_requests(["r", "w"])
    assert running.structured.matcher is None and waiting.structured.matcher is None
    assert not core.has_unfinished_requests()
    core.check_invariants()


# ---------------------------------------------------------------- the sampler
def _mask_for(allowed_per_row):
    bitmask = allocate_bitmask(len(allowed_per_row), VOCAB)
    bitmask[:] = 0
    for r, ids in enumerate(allowed_per_row):
        for t in ids:
            bitmask[r, t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
    return bitmask


def test_bitmask_unpacks_every_bit_including_the_sign_bit():
    bitmask = _mask_for([[0, 31, 32, 63], [5]])
    allowed = unpack_bitmask(bitmask)
    assert np.flatnonzero(allowed[0]).tolist() == [0, 31, 32, 63]
    assert np.flatnonzero(allowed[1]).tolist() == [5]


def test_sampler_masks_only_constrained_rows_and_biases_only_biased_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0.0,
                                                                      logit_bias={7: 100.0})]
    gens = [None, None, torch.Generator().manual_seed(1), None]
    mask = GrammarMask.from_rows([1, 2], _mask_for([[3], [10, 11]]), "cpu")
    md = SamplingMetadata.build(params, [[1]] * 4, [[]] * 4, gens, frozenset(), VOCAB, "cpu",
                                grammar=mask)
    before = logits.clone()
    out = Sampler()(logits, md)
    assert torch.equal(logits, before)                       # the caller's logits untouched
    assert out.sampled_token_ids[0] == int(logits[0].argmax())
    assert out.sampled_token_ids[1] == 3
    assert out.sampled_token_ids[2] in (10, 11)
    assert out.sampled_token_ids[3] == 7
    plain = SamplingMetadata.build(params[:1], [[1]], [[]], [None], frozenset(), VOCAB, "cpu")
    assert plain.grammar is None and plain.logit_bias is None
