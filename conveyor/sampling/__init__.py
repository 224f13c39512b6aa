"""Sampling: per-step metadata built from SamplingParams, and the batched Sampler.

Public API: ``SamplingMetadata.build(...)`` once per step, then ``Sampler()(logits, metadata)``
returns a ``SamplerOutput`` (token ids, and logprobs when any row asked for them).
"""

from conveyor.sampling.metadata import SamplingMetadata
from conveyor.sampling.sampler import Sampler, SamplerOutput

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata"]
