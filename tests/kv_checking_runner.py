"""A fake model runner that simulates the KV cache itself, for scheduler tests that need no model.

Like ``FakeRunner`` it "samples" a token that is a pure function of the request's tokens so far,
but it also keeps what every device block and every host (swap) block holds: one token id per
slot. Swap copies run in the runner's order (swap-outs, then swap-ins), every scheduled request's
already computed tokens must be found in its blocks (so a prefix-cache hit, a swap-in or a block
handed to two owners that is wrong shows up as a mismatch), and the ids the runner holds state or a
generator for are tracked: an id leaves ``held`` only when the scheduler reports it finished.
"""

from __future__ import annotations

from conveyor.core.outputs import ModelRunnerOutput, SchedulerOutput
from fake_runner import fake_token


class KVCheckingRunner:
    def __init__(self, block_size: int, vocab: int = 1000):
        self.block_size = block_size
        self.vocab = vocab
        self.device: dict[int, list[int | None]] = {}
        self.host: dict[int, list[int | None]] = {}
        self.state: dict[str, dict] = {}
        self.held: set[str] = set()          # ids with runner state or a (seeded) generator
        self.steps: list[SchedulerOutput] = []

    def _block(self, b: int) -> list[int | None]:
        return self.device.setdefault(b, [None] * self.block_size)

    def _swap(self, sched: SchedulerOutput) -> None:
        for dev, host in sched.swap_out:
            self.host[host] = list(self._block(dev))
        for host, dev in sched.swap_in:
            self.device[dev] = list(self.host[host])

    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_request_ids:
            self.state.pop(rid, None)
            self.held.discard(rid)
        for rid in sched.preempted_request_ids:
            self.state.pop(rid, None)        # a generator would be kept: the request comes back
        for new in sched.new_requests:
            self.state[new.request_id] = dict(
                tokens=new.prompt_token_ids + new.output_token_ids, blocks=list(new.block_ids),
                computed=new.num_computed_tokens)
            self.held.add(new.request_id)
        for c in sched.cached_requests:
            st = self.state[c.request_id]
            assert st["computed"] == c.num_computed_tokens
            st["blocks"].extend(c.new_block_ids)

    def _check_kv(self, rid: str, st: dict) -> None:
        bs = self.block_size
        for pos in range(st["computed"]):
            got = self._block(st["blocks"][pos // bs])[pos % bs]
            assert got == st["tokens"][pos], (
                f"{rid}: KV at position {pos} holds token {got}, expected {st['tokens'][pos]}")

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.steps.append(sched)
        self._swap(sched)
        self._update_states(sched)
        ids, toks = [], []
        for rid, n in sched.num_scheduled_tokens.items():
            st = self.state[rid]
            self._check_kv(rid, st)
            start, st["computed"] = st["computed"], st["computed"] + n
            assert st["computed"] <= len(st["tokens"])
            assert len(st["blocks"]) * self.block_size >= st["computed"]
            for pos in range(start, st["computed"]):
                self._block(st["blocks"][pos // self.block_size])[pos % self.block_size] = \
                    st["tokens"][pos]
            if st["computed"] == len(st["tokens"]):
                tok = fake_token(st["tokens"], self.vocab)
                st["tokens"].append(tok)
                ids.append(rid)
                toks.append(tok)
        return ModelRunnerOutput(ids, toks)
