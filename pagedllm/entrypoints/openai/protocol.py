"""The OpenAI API's request bodies, validated with pydantic, and their SamplingParams.

Types are strict (a string is not a number) and unknown fields are ignored, as
OpenAI does. Ranges are checked where `SamplingParams` checks them, so an error
names the field whatever its source. Besides OpenAI's fields both endpoints take
vLLM's extra sampling fields (`top_k`, `min_p`, `repetition_penalty`, ...).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pagedllm.sampling_params import (
    MAX_CHOICES,
    MAX_LOGIT_BIAS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    BeamSearchParams,
    SamplingParams,
    StructuredOutputsParams,
)

# OpenAI's own bound; a larger n would fork that many sequences from one request.
MAX_N = 128
# One completions request may carry a list of prompts; each becomes n sequences.
MAX_PROMPTS = 256
MAX_SEQUENCES_PER_REQUEST = 512
# A conversation's messages, and their content parts all together.
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 8192
MAX_TOOLS = 128

# Lists are bounded in the schema, so validation refuses an over-long one from its
# length before looking at its items, and stops at the first bad item (fail_fast)
# instead of listing a million errors.
TokenIds = Annotated[list[int], Field(fail_fast=True)]
StopStrings = Annotated[
    list[Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS)]],
    Field(max_length=MAX_STOP_STRINGS, fail_fast=True),
]
Prompt = (
    str
    | Annotated[list[str], Field(max_length=MAX_PROMPTS, fail_fast=True)]
    | TokenIds
    | Annotated[list[TokenIds], Field(max_length=MAX_PROMPTS, fail_fast=True)]
)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, use_attribute_docstrings=True)


class StreamOptions(_Body):
    include_usage: bool | None = False


class JsonSchemaFormat(_Body):
    """OpenAI's `response_format.json_schema`: the schema the output must follow."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """OpenAI's `response_format`: plain text, any JSON object, or a JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.json_schema is None or self.json_schema.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return StructuredOutputsParams(json=self.json_schema.json_schema)


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: exactly one of these constraints."""

    json_schema: dict[str, Any] | str | None = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: Annotated[list[str], Field(max_length=MAX_CHOICES)] | None = None
    grammar: str | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    def constraint(self) -> StructuredOutputsParams:
        return StructuredOutputsParams(
            json=self.json_schema,
            json_object=self.json_object,
            regex=self.regex,
            choice=self.choice,
            grammar=self.grammar,
        )


class _SamplingFields(_Body):
    """Fields shared by both endpoints; None means the default."""

    model: str | None = None
    n: int | None = Field(default=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    seed: int | None = None
    stop: Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS)] | StopStrings | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions, documented in the OpenAPI schema by their docstrings
    top_k: int | None = None
    """vLLM: sample from the k most likely tokens only (0 or -1: all)."""
    min_p: float | None = None
    """vLLM: drop tokens less likely than min_p times the most likely one."""
    repetition_penalty: float | None = None
    """vLLM: divide (or multiply) the logits of tokens seen in the prompt or output."""
    min_tokens: int | None = None
    """vLLM: no EOS or stop token before this many tokens."""
    ignore_eos: bool | None = None
    """vLLM: generate past EOS, up to max_tokens."""
    stop_token_ids: Annotated[TokenIds, Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    """vLLM: token ids that end the output, as EOS does."""
    include_stop_str_in_output: bool | None = None
    """vLLM: keep the stop string that ended the output in its text."""
    skip_special_tokens: bool | None = None
    """vLLM: leave special tokens out of the text (default true)."""
    prompt_logprobs: int | None = None
    """vLLM: the top-k logprobs of every prompt token (not with stream)."""
    # structured output: OpenAI's response_format, vLLM's structured_outputs and its
    # older guided_* fields (one of them at most)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    """vLLM: constrain the output to a JSON schema, any JSON object, a regex, a choice or
    a grammar (Lark/EBNF or GBNF): exactly one."""
    guided_json: dict[str, Any] | str | None = None
    """vLLM (older form of structured_outputs.json): a JSON schema for the output."""
    guided_regex: str | None = None
    """vLLM (older form of structured_outputs.regex): a regular expression."""
    guided_choice: Annotated[list[str], Field(max_length=MAX_CHOICES)] | None = None
    """vLLM (older form of structured_outputs.choice): one of these strings."""
    guided_grammar: str | None = None
    """vLLM (older form of structured_outputs.grammar): a Lark/EBNF or GBNF grammar."""
    use_beam_search: bool | None = None
    """vLLM: beam search with n beams, answering the n best, best first. The search
    ranks by the model's own log-probabilities, so the fields that shape sampling
    (temperature other than 0 or 1, top_p/top_k/min_p, penalties, logit_bias, stop,
    logprobs, structured outputs) are refused with it."""
    length_penalty: float | None = None
    """vLLM (beam search only): finished beams rank by cum_logprob / length ** length_penalty."""
    kv_transfer_params: dict[str, Any] | None = None
    """vLLM (disaggregated serving): where a decode instance pulls the prompt's KV from, as
    the prefill instance's response gave it (`pagedllm router` passes it on)."""

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _constraint(self) -> StructuredOutputsParams | None:
        """The one structured-output constraint the body sets, if any."""
        guided = {
            "json": self.guided_json,
            "regex": self.guided_regex,
            "choice": self.guided_choice,
            "grammar": self.guided_grammar,
        }
        sources = [
            name
            for name, value in (
                ("response_format", self.response_format and self.response_format.type != "text"),
                ("structured_outputs", self.structured_outputs),
                *((f"guided_{k}", v is not None) for k, v in guided.items()),
            )
            if value
        ]
        if len(sources) > 1:
            raise ValueError(
                f"structured_outputs: set one constraint at most, got {', '.join(sources)}"
            )
        if self.response_format is not None:
            return self.response_format.constraint()
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint()
        set_guided = {k: v for k, v in guided.items() if v is not None}
        return StructuredOutputsParams(**set_guided) if set_guided else None  # type: ignore[arg-type]

    def _sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams | BeamSearchParams:
        """SamplingParams (BeamSearchParams with use_beam_search) from the set fields;
        raises ValueError naming the bad one."""
        if self.use_beam_search:
            return self._beam_search_params(max_tokens, logprobs, prompt_logprobs)
        if self.length_penalty not in (None, 1):  # 1, the neutral value, some clients send
            raise ValueError("length_penalty: applies to beam search only (use_beam_search)")
        values: dict[str, object] = {
            "max_tokens": max_tokens,
            "logprobs": logprobs,
            "prompt_logprobs": prompt_logprobs,
        }
        for name in (
            "n",
            "temperature",
            "top_p",
            "presence_penalty",
            "frequency_penalty",
            "seed",
            "top_k",
            "min_p",
            "repetition_penalty",
            "min_tokens",
            "ignore_eos",
            "stop_token_ids",
            "include_stop_str_in_output",
            "skip_special_tokens",
            "logit_bias",
            "kv_transfer_params",
        ):
            value = getattr(self, name)
            if value is not None:
                values[name] = value
        if self.stop is not None:
            values["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        try:
            values["structured_outputs"] = self._constraint()
        except ValueError as e:
            message = str(e)
            if not message.startswith(("structured_outputs", "tool_choice")):
                message = f"structured_outputs: {message}"
            raise ValueError(message) from None
        return SamplingParams(**values)  # type: ignore[arg-type]

    def _beam_search_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None
    ) -> BeamSearchParams:
        """BeamSearchParams (beam width n); a field that shapes sampling is refused, as
        the search would not use it."""
        shaping = {name: getattr(self, name) for name in _NEUTRAL_FOR_BEAM_SEARCH}
        shaping |= {"logprobs": logprobs, "prompt_logprobs": prompt_logprobs}
        for name, value in shaping.items():
            if value is not None and value not in _NEUTRAL_FOR_BEAM_SEARCH.get(name, ()):
                raise ValueError(
                    f"{name}: not supported with use_beam_search (the search ranks beams by "
                    "the model's own log-probabilities)"
                )
        if self._constraint() is not None:
            raise ValueError("structured_outputs: not supported with use_beam_search")
        return BeamSearchParams(
            beam_width=self.n or 1,
            max_tokens=max_tokens,
            length_penalty=1.0 if self.length_penalty is None else self.length_penalty,
            ignore_eos=bool(self.ignore_eos),
        )


# Fields that shape sampling, and the values with which beam search may still take them.
_NEUTRAL_FOR_BEAM_SEARCH: dict[str, tuple[object, ...]] = {
    "temperature": (0, 1),
    "top_p": (1,),
    "top_k": (0, -1),
    "min_p": (0,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "repetition_penalty": (1,),
    "min_tokens": (0,),
    "logit_bias": ({},),
    "stop": ([], ""),
    "stop_token_ids": ([],),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
}


# The names SamplingParams puts first in its errors, reported as the error's `param`.
SAMPLING_PARAM_NAMES = (
    "structured_outputs",
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "max_tokens",
    "min_tokens",
    "stop",
    "stop_token_ids",
    "logprobs",
    "prompt_logprobs",
    "include_stop_str_in_output",
    "ignore_eos",
    "skip_special_tokens",
    "length_penalty",
)


def _refuse(fields: dict[str, str]) -> Any:
    """A before-validator refusing fields pagedllm does not implement (set to anything but
    null or false; `modalities` also ["text"]), each with why, so that no client silently
    loses what it asked."""

    def check(data: Any) -> Any:
        if isinstance(data, dict):
            for name, why in fields.items():
                value = data.get(name)
                if value is not None and value is not False and value != ["text"]:
                    raise ValueError(f"{name}: not supported ({why})")
        return data

    return model_validator(mode="before")(check)


_UNSUPPORTED_COMMON = {
    "prediction": "predicted outputs are not implemented",
    "service_tier": "there is one tier",
    "store": "responses are not stored",
}
_UNSUPPORTED_CHAT = {
    **_UNSUPPORTED_COMMON,
    "audio": "the models served here read and write text only",
    "modalities": 'only ["text"]',
    "functions": "use tools (functions is OpenAI's deprecated form)",
    "function_call": "use tool_choice (function_call is OpenAI's deprecated form)",
    "web_search_options": "there is no web search",
}


class CompletionRequest(_SamplingFields):
    """`POST /v1/completions`."""

    _unsupported = _refuse(_UNSUPPORTED_COMMON)

    prompt: Prompt
    max_tokens: int | None = 16
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list: one text, texts, one token-id list or token-id lists."""
        prompts = prompt_list(self.prompt, "prompt")
        n = self.n or 1  # the schema bounds the list itself at MAX_PROMPTS
        if n * len(prompts) > MAX_SEQUENCES_PER_REQUEST:
            raise ValueError(
                f"prompt lists {len(prompts)} prompts with n={n}: {n * len(prompts)} "
                f"sequences, more than the {MAX_SEQUENCES_PER_REQUEST} one request may start"
            )
        return prompts

    def to_sampling_params(self) -> SamplingParams | BeamSearchParams:
        self.check_prompt_logprobs()
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError(
                f"best_of must equal n (best_of > n is not supported), got {self.best_of}"
            )
        # echo with logprobs also scores the prompt, as OpenAI does
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        if self.prompt_logprobs is not None:
            prompt_logprobs = max(self.prompt_logprobs, prompt_logprobs or 0)
        return self._sampling_params(self.max_tokens, self.logprobs, prompt_logprobs)

    def check_prompt_logprobs(self) -> None:
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not supported with stream (as in vLLM)")


class TextContent(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text


class ToolCallItem(_Body):
    """A call an assistant made, as a conversation sends it back."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContent] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCallItem], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: str | None = None

    def to_template(self) -> dict[str, Any]:
        """The message as the chat template reads it: text content, `developer` as `system`,
        a call's arguments as an object (what Hugging Face templates expect)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": _json_or_text(call)},
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None and role == "tool":
            message["name"] = self.name
        return message


def _json_or_text(call: ToolCallItem) -> Any:
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


class FunctionDefinition(_Body):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


def _check_conversation_size(data: Any) -> Any:
    """Refuse too many messages or content parts before a single one is validated."""
    messages = data.get("messages") if isinstance(data, dict) else None
    if isinstance(messages, list):
        if len(messages) > MAX_MESSAGES:
            raise ValueError(f"messages: at most {MAX_MESSAGES} messages, got {len(messages)}")
        parts = sum(
            len(m["content"])
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), list)
        )
        if parts > MAX_CONTENT_PARTS:
            raise ValueError(f"messages: at most {MAX_CONTENT_PARTS} content parts, got {parts}")
    return data


class ChatCompletionRequest(_SamplingFields):
    """`POST /v1/chat/completions`."""

    _check_size = model_validator(mode="before")(_check_conversation_size)
    _unsupported = _refuse(_UNSUPPORTED_CHAT)

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM: more variables for the chat template (e.g. enable_thinking)."""
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = True

    def tool_mode(self) -> str:
        """ "none" (no tools offered), "auto", "required", or "named"."""
        choice = self.tool_choice
        if not self.tools:
            if choice is not None and choice != "none":
                raise ValueError("tool_choice needs tools")
            return "none"
        if choice is None:
            return "auto"
        return "named" if isinstance(choice, NamedToolChoice) else choice

    def tool_functions(self) -> list[dict[str, Any]]:
        return [tool.function.model_dump(exclude_none=True) for tool in self.tools or ()]

    def named_function(self) -> dict[str, Any]:
        assert isinstance(self.tool_choice, NamedToolChoice)
        name = self.tool_choice.function.name
        for function in self.tool_functions():
            if function["name"] == name:
                return function
        raise ValueError(f"tool_choice names {name!r}, which is not among the tools")

    def _constraint(self) -> StructuredOutputsParams | None:
        """A forced call's grammar ("required", a named function), else the body's own."""
        from pagedllm.entrypoints.openai.tool_calls import named_schema, required_schema

        mode = self.tool_mode()
        if mode not in ("required", "named"):
            return super()._constraint()
        if super()._constraint() is not None:
            raise ValueError(f"structured_outputs: tool_choice {mode!r} sets the output's shape")
        if mode == "named":
            return StructuredOutputsParams(json=named_schema(self.named_function()))
        schema = required_schema(self.tool_functions(), self.parallel_tool_calls is not False)
        return StructuredOutputsParams(json=schema)

    def to_sampling_params(self) -> SamplingParams | BeamSearchParams:
        if not self.messages:
            raise ValueError("messages must not be empty")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        if self.prompt_logprobs is not None and self.stream:
            raise ValueError("prompt_logprobs is not supported with stream (as in vLLM)")
        return self._sampling_params(max_tokens, logprobs, self.prompt_logprobs)


class TokenizeRequest(_Body):
    """`POST /tokenize`: a prompt, or chat messages rendered by the template."""

    _check_size = model_validator(mode="before")(_check_conversation_size)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    """`POST /detokenize`."""

    model: str | None = None
    tokens: TokenIds


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """OpenAI's error body, as every refusal is sent (documented in the OpenAPI schema)."""

    error: ErrorInfo


class AnthropicErrorInfo(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """Anthropic's error body, as the /v1/messages routes send every refusal."""

    type: Literal["error"]
    error: AnthropicErrorInfo


class EmbeddingRequest(_Body):
    """`POST /v1/embeddings`: OpenAI's body (input as text, texts, token ids or lists of
    them), plus vLLM's `normalize`."""

    model: str | None = None
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    normalize: bool = True

    def inputs(self) -> list[str | list[int]]:
        """The input as a list: one text, texts, one token-id list or token-id lists."""
        return prompt_list(self.input, "input")


def prompt_list(value: str | list[str] | list[int] | list[list[int]], name: str) -> list:
    """One text, texts, one token-id list or token-id lists, as a list of prompts."""
    if isinstance(value, str):
        return [value]
    if not value:
        raise ValueError(f"{name} must not be empty")
    if isinstance(value[0], int):
        return [value]
    return list(value)


class AnthropicTextBlock(_Body):
    type: Literal["text"]
    text: str


AnthropicContent = str | Annotated[list[AnthropicTextBlock], Field(max_length=MAX_CONTENT_PARTS)]


class AnthropicMessage(_Body):
    role: Literal["user", "assistant"]
    content: AnthropicContent

    def text(self) -> str:
        return _block_text(self.content)


def _block_text(content: AnthropicContent | None) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(b.text for b in content)


class MessagesRequest(_Body):
    """`POST /v1/messages`: Anthropic's Messages API (text content blocks)."""

    _check_size = model_validator(mode="before")(_check_conversation_size)

    model: str | None = None
    max_tokens: int
    messages: list[AnthropicMessage]
    system: AnthropicContent | None = None
    stop_sequences: StopStrings | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool | None = False
    metadata: dict[str, Any] | None = None  # Anthropic's user_id tag: nothing to do with it

    def to_chat(self) -> ChatCompletionRequest:
        """The same conversation as a chat completion: one path into the engine."""
        messages: list[dict[str, Any]] = []
        if self.system:
            messages.append({"role": "system", "content": _block_text(self.system)})
        messages += [{"role": m.role, "content": m.text()} for m in self.messages]
        fields: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "stream": bool(self.stream),
        }
        for name in ("temperature", "top_p", "top_k"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        if self.stop_sequences:
            fields["stop"] = self.stop_sequences
        return ChatCompletionRequest.model_validate(fields)


class CountTokensRequest(_Body):
    """`POST /v1/messages/count_tokens`."""

    _check_size = model_validator(mode="before")(_check_conversation_size)

    model: str | None = None
    messages: list[AnthropicMessage]
    system: AnthropicContent | None = None

    def to_chat(self) -> ChatCompletionRequest:
        return MessagesRequest(
            model=self.model, max_tokens=1, messages=self.messages, system=self.system
        ).to_chat()


class ResponsesContentPart(_Body):
    type: Literal["input_text", "output_text", "text"]
    text: str


class ResponsesInputMessage(_Body):
    """A message item of the Responses API's `input`."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[ResponsesContentPart], Field(max_length=MAX_CONTENT_PARTS)]

    def text(self) -> str:
        content = self.content
        return content if isinstance(content, str) else "".join(p.text for p in content)


class ResponsesTextFormat(_Body):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponsesText(_Body):
    format: ResponsesTextFormat | None = None


class ResponsesFunctionTool(_Body):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponsesRequest(_Body):
    """`POST /v1/responses`: OpenAI's Responses API (text in, text or calls out)."""

    model: str | None = None
    input: str | Annotated[list[ResponsesInputMessage], Field(max_length=MAX_MESSAGES)]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    text: ResponsesText | None = None
    tools: Annotated[list[ResponsesFunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    def messages(self) -> list[dict[str, Any]]:
        """This request's own turn as chat messages (instructions first)."""
        out: list[dict[str, Any]] = []
        if self.instructions:
            out.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            out.append({"role": "user", "content": self.input})
        else:
            out += [{"role": m.role, "content": m.text()} for m in self.input]
        return out

    def to_chat(self, history: list[dict[str, Any]]) -> ChatCompletionRequest:
        """The conversation (a stored `history`, then this turn) as a chat completion."""
        fields: dict[str, Any] = {
            "model": self.model,
            "messages": [*history, *self.messages()],
            "max_tokens": self.max_output_tokens,
        }
        for name in ("temperature", "top_p", "tool_choice", "parallel_tool_calls"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        if self.tools:
            fields["tools"] = [
                {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                for t in self.tools
            ]
        text_format = self.text.format if self.text else None
        if text_format is not None and text_format.type != "text":
            fields["response_format"] = (
                {"type": "json_object"}
                if text_format.type == "json_object"
                else {
                    "type": "json_schema",
                    "json_schema": {"name": text_format.name, "schema": text_format.json_schema},
                }
            )
        return ChatCompletionRequest.model_validate(fields)
