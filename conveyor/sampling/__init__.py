"""Sampling: per-step metadata built from SamplingParams, and the batched Sampler.

Public API: ``SamplingMetadata.build(...)`` once per step, then ``Sampler()(logits, metadata)``
returns a ``SamplerOutput`` (token ids, and logprobs when any row asked for them).
``is_plain_greedy`` tells a caller when a row's token is just the raw logits' argmax.
"""

from conveyor.sampling.metadata import SamplingMetadata, is_plain_greedy
from conveyor.sampling.sampler import Sampler, SamplerOutput

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata", "is_plain_greedy"]
