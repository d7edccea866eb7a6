"""Speculative decoding: proposers draft tokens for running requests (n-gram lookup
between steps, a draft model after scheduling); the step verifies them
(worker/model_runner.py) and the scheduler keeps what was accepted."""

from pagedllm.spec_decode.draft_model import DraftModelProposer, load_draft_model
from pagedllm.spec_decode.ngram import NgramProposer
from pagedllm.spec_decode.proposer import PENDING_DRAFT, Proposer
from pagedllm.spec_decode.stats import SpecDecodeStats

__all__ = [
    "PENDING_DRAFT",
    "DraftModelProposer",
    "NgramProposer",
    "Proposer",
    "SpecDecodeStats",
    "load_draft_model",
]
