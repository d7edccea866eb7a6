"""pagedllm: an LLM inference and serving engine built on PagedAttention."""

from pagedllm.pooling_params import PoolingParams
from pagedllm.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "BeamSearchParams", "PoolingParams", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # LLM pulls in torch and the model stack: import it only when asked for
    if name == "LLM":
        from pagedllm.entrypoints.llm import LLM

        return LLM
    raise AttributeError(name)
