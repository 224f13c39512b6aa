"""Preemption by swapping: a preempted request's KV blocks are copied to a host-memory pool and
copied back when it resumes, instead of being recomputed.

The core only does the bookkeeping (which device block goes to which host block); the runner does
the copies at the start of the next step, swap-outs before swap-ins, before the forward pass, so
a device block freed by a swap-out can be reused in the same step. For the same reason the host
blocks a swap-in reads are released only when the step's copies have been handed out
(``end_step``): a swap-out in the same step must not overwrite them first. ``mode``:

- "recompute": never swap (the default);
- "swap": swap whenever the host pool has room, else recompute;
- "auto": swap only when the estimated copy cost (blocks out and back) is below the estimated
  cost of recomputing the request's tokens, per request.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.core.block_pool import BlockPool
from conveyor.core.request import Request

PREEMPTION_MODES = ("recompute", "swap", "auto")


@dataclass(frozen=True, slots=True)
class PreemptionCosts:
    """Seconds to recompute one token, and to copy one block out to the host and back."""

    recompute_s_per_token: float
    swap_s_per_block: float


class SwapManager:
    def __init__(self, num_host_blocks: int, mode: str, costs: PreemptionCosts):
        if mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption mode must be one of {PREEMPTION_MODES}, got {mode!r}")
        self.pool = BlockPool(num_host_blocks)
        self.mode = mode
        self.costs = costs
        self._host_tables: dict[str, list[int]] = {}
        self._read_this_step: list[int] = []     # host blocks this step's swap-ins copy from
        self.num_swap_outs = 0

    def is_swapped(self, request: Request) -> bool:
        return request.request_id in self._host_tables

    def should_swap(self, request: Request, num_blocks: int) -> bool:
        if self.mode == "recompute" or num_blocks == 0 or not self.pool.can_allocate(num_blocks):
            return False
        if self.mode == "swap":
            return True
        swap = num_blocks * self.costs.swap_s_per_block
        return swap < request.num_computed_tokens * self.costs.recompute_s_per_token

    def swap_out(self, request: Request, device_blocks: list[int]) -> list[tuple[int, int]]:
        """Reserve host blocks for the request's device blocks; (device, host) copy pairs."""
        host = self.pool.allocate(len(device_blocks))
        self._host_tables[request.request_id] = host
        self.num_swap_outs += 1
        return list(zip(device_blocks, host))

    def swap_in(self, request: Request, device_blocks: list[int]) -> list[tuple[int, int]]:
        """(host, device) copy pairs into ``device_blocks``; the host blocks are released at
        ``end_step`` (after this step's copies)."""
        host = self._host_tables.pop(request.request_id)
        self._read_this_step += host
        return list(zip(host, device_blocks[:len(host)]))

    def end_step(self) -> None:
        """This step's copies are handed to the runner: host blocks read by swap-ins are free."""
        if self._read_this_step:
            self.pool.free(self._read_this_step)
            self._read_this_step = []

    def free(self, request: Request) -> None:
        host = self._host_tables.pop(request.request_id, None)
        if host:
            self.pool.free(host)

    def check_invariant(self) -> None:
        self.pool.check_invariant()
        held = sum(len(t) for t in self._host_tables.values()) + len(self._read_this_step)
        if held + self.pool.num_free_blocks != self.pool.num_blocks:
            raise AssertionError("host swap pool leaked blocks")
