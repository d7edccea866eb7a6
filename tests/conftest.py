"""Shared fixtures: the default model (ours and the transformers reference), loaded once."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton reads this when its kernels are decorated, at import: set before any test module
# (an engine test picks the attention backend, importing triton) so that the Triton tests
# run in the interpreter whatever the order; TRITON_INTERPRET=0 runs them on a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def default_model_path():
    from pagedllm.model.loader import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def model_f32(default_model_path):
    from pagedllm.model.loader import load_model

    return load_model(default_model_path, torch.float32, exact_matmul=True)


@pytest.fixture(scope="session")
def hf_reference(default_model_path):
    """transformers' own Llama on the same GGUF file: the reference for logits."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        str(default_model_path.parent), gguf_file=default_model_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(default_model_path):
    from pagedllm.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path)


ENGLISH = (
    "The history of computing is a story of abstractions piled on abstractions. Early machines "
    "were programmed by rewiring panels; then came stored programs, assemblers, compilers and "
    "operating systems that share one processor among many tasks. Virtual memory let each "
    "program believe it owned the whole address space, while the kernel quietly mapped its "
    "pages onto whatever physical frames were free. "
)
