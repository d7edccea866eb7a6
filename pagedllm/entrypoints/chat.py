"""`pagedllm chat`: an interactive, streaming chat in the terminal, like `llama-cli`.

The conversation is kept across turns and rendered through the model's chat template
each turn (prefix caching reuses the KV blocks of the turns before). Commands:
`/clear` starts over (keeping the system prompt), `/exit` or Ctrl-D quits, `/help`
lists them; a line ending in `\\` continues on the next. Ctrl-C stops the reply being
written and returns to the prompt; the partial reply stays in the history, as
llama-cli keeps it in its context. Ctrl-C at the prompt drops the line typed so far.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from pagedllm.entrypoints.cli_args import (
    HelpFormatter,
    add_engine_args,
    add_model_arg,
    add_sampling_args,
    engine_args_from,
    sampling_params_from,
)
from pagedllm.tokenizer import Message, Tokenizer

if TYPE_CHECKING:
    from collections.abc import Callable

    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.sampling_params import SamplingParams

PROMPT = "> "
CONTINUATION = "... "
HELP = "/clear resets the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply"


@dataclass
class Conversation:
    """The messages so far, an optional system prompt first."""

    system: str | None = None
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})

    def pop(self) -> Message:
        return self.messages.pop()

    @property
    def num_turns(self) -> int:
        return sum(m["role"] == "user" for m in self.messages)

    def prompt_token_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The whole conversation rendered for the model's next (assistant) message."""
        return tokenizer.encode_chat(self.messages, add_generation_prompt=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal, streamed",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        epilog=HELP,
        formatter_class=HelpFormatter,
    )
    add_model_arg(parser)
    parser.add_argument(
        "--system", default=None, help="system prompt (default: the chat template's)"
    )
    parser.add_argument(
        "--stats",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print each reply's timings (prompt tokens, TTFT, tokens/s) on stderr",
    )
    add_sampling_args(parser, max_tokens=-1)
    add_engine_args(parser)
    parser.set_defaults(func=run_chat)


def read_message(stdout: TextIO) -> str | None:
    """One message from the user (lines ending in `\\` continue); None at end of input.

    Ctrl-C drops what was typed and asks again, as a shell does: only here does it raise
    KeyboardInterrupt (which is how input() gives up the line).
    """
    lines: list[str] = []
    while True:
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            line = input(CONTINUATION if lines else PROMPT)
        except EOFError:
            return None
        except KeyboardInterrupt:
            lines = []
            stdout.write(f"\n({HELP})\n")
            stdout.flush()
            continue
        finally:
            signal.signal(signal.SIGINT, previous)
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def run_chat(args: argparse.Namespace) -> int:
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.entrypoints.streaming import StopOnSigint

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    try:
        params = sampling_params_from(args)
        engine = LLMEngine(engine_args_from(args))
    except ValueError as e:  # a flag's value, or a context longer than the model's
        print(f"pagedllm chat: error: {e}", file=sys.stderr)
        return 2
    tokenizer = engine.tokenizer
    if not tokenizer.has_chat_template:
        print(
            "pagedllm chat: error: this model has no chat template; use `pagedllm generate`",
            file=sys.stderr,
        )
        return 2
    out = sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    write(f"Chatting with {engine.model_path.name}. {HELP}.\n\n")
    # Between prompts and replies Ctrl-C is ignored rather than ending the program.
    with StopOnSigint():
        return _chat_loop(engine, Conversation(system=args.system), params, args.stats, write)


def _chat_loop(
    engine: LLMEngine,
    conversation: Conversation,
    params: SamplingParams,
    stats: bool,
    write: Callable[[str], object],
) -> int:
    from pagedllm.entrypoints.streaming import stream_reply

    tokenizer = engine.tokenizer
    while True:
        text = read_message(sys.stdout)
        if text is None:  # Ctrl-D
            write("\n")
            return 0
        command = text.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/clear":
            conversation.clear()
            write("(conversation cleared)\n")
            continue
        if command == "/help":
            write(f"({HELP}; end a line with \\ to continue it)\n")
            continue
        if not command:
            continue
        conversation.add("user", text)
        try:
            reply = stream_reply(engine, conversation.prompt_token_ids(tokenizer), params, write)
        except ValueError as e:  # the conversation no longer fits the context, mostly
            conversation.pop()
            write(f"error: {e}\n(/clear starts a new conversation)\n")
            continue
        conversation.add("assistant", reply.text)
        write("\n")
        if reply.interrupted:
            write("(stopped)\n")
        if stats:
            print(f"[{reply.timings()}]", file=sys.stderr, flush=True)
