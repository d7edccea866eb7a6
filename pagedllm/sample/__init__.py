"""Sampling: from a batch of logits to one token per request."""

from pagedllm.sample.logprobs import LogprobsTensors, compute_logprobs, compute_prompt_logprobs
from pagedllm.sample.metadata import RowSamplingState, SamplingMetadata, seeded_generator
from pagedllm.sample.sampler import Sampler, SamplerOutput

__all__ = [
    "LogprobsTensors",
    "RowSamplingState",
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "compute_logprobs",
    "compute_prompt_logprobs",
    "seeded_generator",
]
