"""Speculative decoding in the core: which drafts a request may carry, and the counters.

Drafts are proposed by the runner after a step (``ModelRunnerOutput.draft_token_ids``) and kept
on ``Request.spec_token_ids`` until the next ``schedule()``, which schedules them as ordinary
tokens under the one budget (``SchedulerOutput.scheduled_spec_tokens``). Invariants:
- a request's drafts never take it past ``max_tokens`` or the context length (the verified step
  appends accepted drafts plus one more token);
- a constrained request's drafts are a prefix its grammar allows (checked on its matcher, which
  is rolled back: it has consumed exactly the output tokens), so each draft position gets a mask;
- rejected drafts only roll ``num_computed_tokens`` back: their blocks stay allocated and are
  rewritten later, and prefix-cache hashes only ever cover committed tokens.
No torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from conveyor.core.request import Request


def max_drafts(req: Request, max_model_len: int) -> int:
    """Most drafts ``req`` may verify in its next step: room for the drafts plus one token."""
    return max(0, min(req.max_tokens - req.num_output_tokens,
                      max_model_len - req.num_tokens) - 1)


def history_scope(req: Request, isolate_tenants: bool) -> str:
    """Whose finished outputs may feed ``req``'s drafts (the suffix method's cross-request
    index): the same requests whose prefix-cache entries it may hit, i.e. its tenant (unless the
    operator shares the prefix cache globally, ``isolate_tenants=False``) and its cache salt.
    Drafts from another scope would leak that scope's text through acceptance timing."""
    return json.dumps([req.tenant if isolate_tenants else "", req.cache_salt])


def accept_drafts(req: Request, drafts: list[int], max_model_len: int) -> list[int]:
    """The part of ``drafts`` that ``req`` may carry into its next step (see module invariants)."""
    drafts = drafts[:max_drafts(req, max_model_len)]
    sr = req.structured
    if not drafts or sr is None or sr.matcher is None:
        return drafts
    allowed = 0
    for token in drafts:
        if not sr.matcher.accept(token):
            break
        allowed += 1
        if sr.matcher.is_terminated():
            break
    sr.matcher.rollback(allowed)
    return drafts[:allowed]


@dataclass(slots=True)
class SpecDecodeStats:
    """Cumulative counters (vLLM's names): drafts verified, draft tokens, accepted tokens, and
    accepted tokens per draft position (``accepted_per_position[i]``: drafts whose position i
    was accepted)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_draft_tokens:
            self.accepted_per_position += [0] * (num_draft_tokens - len(self.accepted_per_position))
        for i in range(num_accepted):
            self.accepted_per_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verified draft yields on average: accepted drafts + the one sampled token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
