"""A deterministic stand-in for the model runner, for scheduler tests that need no model.

It checks what a real runner relies on (each request's tokens arrive in order, blocks cover them)
and "samples" a token that is a pure function of the request's tokens so far.
"""

from __future__ import annotations

from conveyor.core.outputs import ModelRunnerOutput, SchedulerOutput


def fake_token(tokens: list[int], vocab: int) -> int:
    """The token the fake runners "sample": a pure function of the request's tokens so far."""
    return (sum(tokens) * 31 + len(tokens)) % vocab


class FakeRunner:
    def __init__(self, block_size: int, vocab: int = 1000, eos: int | None = None):
        self.block_size = block_size
        self.vocab = vocab
        self.eos = eos
        self.state: dict[str, dict] = {}
        self.steps: list[SchedulerOutput] = []

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.steps.append(sched)
        for rid in sched.finished_request_ids | sched.preempted_request_ids:
            self.state.pop(rid, None)
        for new in sched.new_requests:
            self.state[new.request_id] = dict(
                tokens=new.prompt_token_ids + new.output_token_ids, blocks=list(new.block_ids),
                computed=new.num_computed_tokens)
        for c in sched.cached_requests:
            st = self.state[c.request_id]
            assert st["computed"] == c.num_computed_tokens
            st["blocks"].extend(c.new_block_ids)
        ids, toks = [], []
        for rid, n in sched.num_scheduled_tokens.items():
            st = self.state[rid]
            st["computed"] += n
            assert st["computed"] <= len(st["tokens"])
            assert len(st["blocks"]) * self.block_size >= st["computed"]
            if st["computed"] == len(st["tokens"]):
                tok = fake_token(st["tokens"], self.vocab)
                st["tokens"].append(tok)
                ids.append(rid)
                toks.append(tok)
        return ModelRunnerOutput(ids, toks)
