"""Static and dynamic batching: the honest baselines continuous batching is measured against.

A batch launches when ``max_num_seqs`` requests wait, or when the oldest has waited
``launch_timeout_s`` (static batching: a long wait for a full batch; dynamic batching: a short
window). Membership is then fixed: the batch prefills every prompt in one step, padded to the
longest, and decodes until its LAST member finishes. Nobody joins mid-batch. A finished member
keeps its slot and its KV blocks until the batch ends, and its slot keeps costing compute: the
runner really executes the padding (``SchedulerOutput.padding_seq_lens``), it is not simulated.

Same ``SchedulerOutput`` and same runner as continuous batching, so a measured difference comes
from the policy alone.
"""

from __future__ import annotations

from conveyor.core.outputs import SchedulerOutput
from conveyor.core.request import Request, RequestStatus
from conveyor.core.scheduler import Scheduler


class BatchScheduler(Scheduler):
    """Fixed-membership batches; see the module docstring."""

    def __init__(self, config, kv_manager, max_model_len: int, launch_timeout_s: float, clock):
        super().__init__(config, kv_manager, max_model_len, clock)
        self.launch_timeout_s = launch_timeout_s
        self.members: list[Request] = []       # the current batch, finished members included
        self.num_batches = 0

    def token_budget(self) -> int:
        # A static batch prefills all its prompts, padded, in one forward (as HF generate does).
        return self.config.max_num_seqs * self.max_model_len

    def _free(self, req: Request) -> None:
        if not any(m is req for m in self.members):
            super()._free(req)
            return
        self._forget(req)                      # blocks and slot stay held until the batch ends
        if all(m.is_finished for m in self.members):
            self._end_batch()

    def schedule(self) -> SchedulerOutput:
        if self.members and all(m.is_finished for m in self.members):
            self._end_batch()                  # the unfinished rest was preempted
        if not self.members:
            return self._launch() if self._should_launch() else self._build_output({}, {}, [], [])
        return self._decode_step()

    def _should_launch(self) -> bool:
        if len(self.waiting) >= self.config.max_num_seqs:
            return True
        return bool(self.waiting) and (
            self.clock() - self.waiting.peek().arrival_time >= self.launch_timeout_s)

    def _launch(self) -> SchedulerOutput:
        num_scheduled, new_blocks = {}, {}
        while self.waiting and self._free_slots:
            req = self.waiting.peek()
            n = req.num_tokens - req.num_computed_tokens
            blocks = self.kv.allocate_slots(req, n)
            if blocks is None:
                break
            self.waiting.pop()
            self._admit(req)
            self.members.append(req)
            num_scheduled[req.request_id] = n
            new_blocks[req.request_id] = blocks
        self.num_batches += 1
        longest = max(m.num_tokens for m in self.members)
        padding = [longest - m.num_tokens for m in self.members if m.num_tokens < longest]
        return self._build_output(num_scheduled, new_blocks, [], list(self.members), padding)

    def _decode_step(self) -> SchedulerOutput:
        num_scheduled, new_blocks, preempted = {}, {}, []
        for req in list(self.running):
            if req.status != RequestStatus.RUNNING:
                continue                       # preempted earlier in this loop
            budget = self.token_budget()
            n, blocks = self._allocate_running(
                req, min(req.num_tokens - req.num_computed_tokens, budget), budget)
            while blocks is None and self.running:
                victim = self.running.pop()
                self.members.remove(victim)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
                blocks = self.kv.allocate_slots(req, n)
            if blocks is None:
                continue
            self._note_drafts(req, n)
            num_scheduled[req.request_id] = n
            new_blocks[req.request_id] = blocks
        padding = [1] * sum(1 for m in self.members if m.is_finished)
        return self._build_output(num_scheduled, new_blocks, preempted, [], padding)

    def _end_batch(self) -> None:
        for m in self.members:
            self.kv.free(m)
            self._release_slot(m.request_id)
        self.members = []
