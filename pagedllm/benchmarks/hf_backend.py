"""The baseline: the same requests through `transformers`' `generate`, in static batches.

Requests run in consecutive batches of `batch_size` (their order in the dataset), each
prompt left-padded to the batch's longest and the batch generating until its longest
output is done, the way a plain `transformers` server would batch them. Only the tokens
each request asked for count as output; the rest of a batch's padded work is the
baseline's waste, reported as `generated_tokens`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pagedllm.benchmarks.datasets import SampleRequest


def load_hf_model(path: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """transformers' own model for `path` (a GGUF file or a Hugging Face folder)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if path.is_file():
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.to(device).eval()


class HFBackend:
    """Runs benchmark requests through `model.generate` (greedy when temperature is 0)."""

    def __init__(
        self,
        model: Any,
        eos_token_id: int | None,
        pad_token_id: int | None,
        temperature: float = 1.0,
    ) -> None:
        self.model = model
        self.temperature = temperature
        self.device = next(model.parameters()).device
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else (eos_token_id or 0)

    @torch.inference_mode()
    def generate_batch(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, n: int, ignore_eos: bool
    ) -> list[list[int]]:
        """New tokens of each completion (n per prompt, prompt-major), EOS padding cut."""
        width = max(len(p) for p in prompts)
        pad = self.pad_token_id
        input_ids = torch.tensor(
            [[pad] * (width - len(p)) + list(p) for p in prompts], device=self.device
        )
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        sampling: dict[str, Any] = (
            {"do_sample": False}
            if self.temperature == 0
            else {"do_sample": True, "temperature": self.temperature, "top_p": 1.0, "top_k": 0}
        )
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            **sampling,
            num_return_sequences=n,
            pad_token_id=pad,
            # no EOS: every row runs to max_new_tokens, as ignore_eos asks
            eos_token_id=None if ignore_eos else self.eos_token_id,
        )
        rows = out[:, width:].tolist()
        if ignore_eos or self.eos_token_id is None:
            return rows
        eos = self.eos_token_id
        return [row[: row.index(eos) + 1] if eos in row else row for row in rows]

    def run(
        self,
        requests: Sequence[SampleRequest],
        batch_size: int,
        n: int = 1,
        ignore_eos: bool = False,
    ) -> tuple[list[list[int]], int, int]:
        """Every request in static batches. Returns the useful length of each completion
        (per request: n lengths), the tokens generated in all, and the number of batches."""
        lengths: list[list[int]] = []
        generated = batches = 0
        for lo in range(0, len(requests), batch_size):
            batch = requests[lo : lo + batch_size]
            rows = self.generate_batch(
                [r.prompt_token_ids for r in batch], max(r.output_len for r in batch), n, ignore_eos
            )
            batches += 1
            generated += sum(len(row) for row in rows)
            for i, request in enumerate(batch):
                lengths.append(
                    [min(len(row), request.output_len) for row in rows[i * n : i * n + n]]
                )
        return lengths, generated, batches


def run_hf_benchmark(
    backend: HFBackend,
    requests: Sequence[SampleRequest],
    batch_size: int,
    n: int,
    ignore_eos: bool,
) -> tuple[dict[str, Any], list[list[int]]]:
    """Warm up, then time the whole workload; returns the report and completion lengths."""
    backend.generate_batch([requests[0].prompt_token_ids[:8]], 2, 1, True)  # warm-up
    if backend.device.type == "cuda":
        torch.cuda.synchronize(backend.device)
    start = time.perf_counter()
    lengths, generated, batches = backend.run(requests, batch_size, n, ignore_eos)
    elapsed = time.perf_counter() - start
    report = {
        "elapsed_s": elapsed,
        "hf_batch_size": batch_size,
        "num_batches": batches,
        "generated_tokens": generated,
    }
    return report, lengths
