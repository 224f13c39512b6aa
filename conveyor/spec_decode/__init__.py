"""Speculative decoding on the runner's side: draft proposers and the verifier.

The core schedules drafts inside its token budget and keeps the books (``core/speculation.py``,
``core/spec_policy.py``); this package proposes drafts after a step (``ngram``, ``suffix``,
``draft_model``) and verifies them on the target model's logits (``verifier``).
"""

from __future__ import annotations

from conveyor.config import SpeculativeConfig
from conveyor.spec_decode.ngram import NgramProposer, Proposer
from conveyor.spec_decode.suffix import SuffixProposer


def build_proposer(config: SpeculativeConfig, draft_builder=None) -> Proposer:
    """The proposer ``config.method`` names; ``draft_builder()`` builds the draft-model one."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "suffix":
        return SuffixProposer(config.prompt_lookup_min, config.prompt_lookup_max,
                              config.suffix_max_requests if config.suffix_cross_request else 0)
    return draft_builder()
