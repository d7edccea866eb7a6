"""`pagedllm generate`: one completion streamed to stdout, then its timings on stderr.

Like llama.cpp's completion tool: `pagedllm generate -p "Once upon a time" -n 64`.
The prompt is completed as raw text unless `--chat` wraps it as a user message in
the model's chat template. Ctrl-C stops the completion and still prints its timings.
"""

from __future__ import annotations

import argparse
import sys

from pagedllm.entrypoints.cli_args import (
    HelpFormatter,
    add_engine_args,
    add_model_arg,
    add_sampling_args,
    engine_args_from,
    sampling_params_from,
)

EXIT_INTERRUPTED = 130  # the shell's code for a program stopped by SIGINT


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="complete one prompt, streamed, then print its timings",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1],
        formatter_class=HelpFormatter,
    )
    add_model_arg(parser)
    parser.add_argument(
        "-p", "--prompt", default=None, help="the prompt (default: read from stdin)"
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message through the model's chat template",
    )
    parser.add_argument(
        "--system", default=None, help="system prompt (with --chat; default: the template's)"
    )
    add_sampling_args(parser, max_tokens=128)
    add_engine_args(parser)
    parser.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.entrypoints.streaming import stream_reply

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        print("pagedllm generate: error: the prompt is empty", file=sys.stderr)
        return 2
    try:
        params = sampling_params_from(args)
        engine = LLMEngine(engine_args_from(args))
    except ValueError as e:  # a flag's value, or a context longer than the model's
        print(f"pagedllm generate: error: {e}", file=sys.stderr)
        return 2
    tokenizer = engine.tokenizer
    try:
        if args.chat:
            messages = [{"role": "user", "content": prompt}]
            if args.system is not None:
                messages.insert(0, {"role": "system", "content": args.system})
            ids = tokenizer.encode_chat(messages)
        else:
            ids = tokenizer.encode(prompt)

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        reply = stream_reply(engine, ids, params, write)
    except ValueError as e:
        print(f"pagedllm generate: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(reply.timings(), file=sys.stderr)
    return EXIT_INTERRUPTED if reply.interrupted else 0
