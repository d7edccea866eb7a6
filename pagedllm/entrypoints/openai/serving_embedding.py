"""`POST /v1/embeddings`: one vector per input, pooled from the model's last hidden
states (the engine's `--pooling`), in OpenAI's list shape, as floats or base64."""

from __future__ import annotations

import asyncio
import base64
import struct

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from pagedllm.entrypoints.openai.errors import APIError, from_exception
from pagedllm.entrypoints.openai.protocol import EmbeddingRequest
from pagedllm.entrypoints.openai.serving_base import OpenAIServing, new_id, until_disconnect
from pagedllm.outputs import EmbeddingRequestOutput
from pagedllm.pooling_params import PoolingParams


class EmbeddingServing(OpenAIServing):
    async def create(self, body: EmbeddingRequest, raw: Request) -> Response:
        model = self.check_model(body.model)
        hidden = self.llm.engine.model_config.hidden_size
        if body.dimensions is not None and body.dimensions != hidden:
            raise APIError(
                400,
                f"dimensions={body.dimensions} is not supported: this model's embeddings "
                f"have {hidden} dimensions and cannot be shortened",
                param="dimensions",
            )
        try:
            inputs = body.inputs()
            prompts = [await self.off_loop(lambda p=p: self.llm.tokenize_prompt(p), len(p))
                       for p in inputs]  # fmt: skip
        except ValueError as e:
            raise APIError(400, f"invalid input: {e}", param="input") from e
        for ids in prompts:
            if len(ids) >= self.max_model_len:
                raise APIError(
                    400,
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, your input has {len(ids)} tokens.",
                    param="input",
                    code="context_length_exceeded",
                )
        request_id = new_id("embd")
        params = PoolingParams(normalize=body.normalize)
        tasks = [
            asyncio.ensure_future(
                self.llm.embed(f"{request_id}-{i}", {"prompt_token_ids": ids}, params)
            )
            for i, ids in enumerate(prompts)
        ]
        try:
            result = await until_disconnect(raw.receive, asyncio.gather(*tasks))
        except Exception as e:  # refused by the engine (queue full, failed): its status
            raise from_exception(e, ("input",)) from e
        finally:
            for task in tasks:
                task.cancel()  # a disconnect or a failure aborts the rest
        if isinstance(result, Response):
            return result
        return JSONResponse(_body(result, model, body.encoding_format))


def _body(outputs: list[EmbeddingRequestOutput], model: str, encoding: str) -> dict:
    data = []
    for i, output in enumerate(outputs):
        vector = output.outputs.embedding
        embedding: list[float] | str = vector
        if encoding == "base64":  # little-endian float32, as OpenAI's client decodes it
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = sum(len(o.prompt_token_ids) for o in outputs)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
