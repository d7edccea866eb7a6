"""Speculative decoding: proposers draft tokens for running requests between steps; the
step verifies them (worker/model_runner.py) and the scheduler keeps what was accepted."""

from pagedllm.spec_decode.ngram import NgramProposer
from pagedllm.spec_decode.stats import SpecDecodeStats

__all__ = ["NgramProposer", "SpecDecodeStats"]
