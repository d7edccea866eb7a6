"""`pagedllm chat` and `pagedllm generate`: flags, the conversation history, and end to end
on a pseudo-terminal (two turns, Ctrl-C mid-reply, /clear, /exit)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from pagedllm.entrypoints.chat import Conversation
from pagedllm.entrypoints.cli import build_parser
from pagedllm.entrypoints.cli_args import sampling_params_from
from pagedllm.model.loader import resolve_model_path
from tests.entrypoints.terminal import Terminal, pagedllm_argv

ENGINE_FLAGS = ("--kv-cache-memory", "0.25")
STATS = r"prompt: (\d+) tokens \| TTFT: [\d.]+ ms \| generated: (\d+) tokens in [\d.]+ s \| "


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_help_lists_sampling_and_engine_flags_with_defaults(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    text = _help(command, capsys)
    for flag, default in [
        ("--temp", "0.8"),
        ("--top-k", "40"),
        ("--top-p", "0.95"),
        ("--min-p", "0.05"),
        ("--repeat-penalty", "1.0"),
        ("--seed", "0"),
        ("--block-size", "16"),
    ]:
        assert re.search(
            re.escape(flag) + r" \S+ .*?\(default: " + re.escape(default) + r"\)", text
        )
    assert "--max-tokens" in text and "--system" in text and "--kv-cache-memory" in text


def test_help_runs_as_a_command() -> None:
    for command in ("chat", "generate"):
        out = subprocess.run(
            pagedllm_argv(command, "--help"), capture_output=True, text=True, check=True
        ).stdout
        assert out.startswith(f"usage: pagedllm {command}")


def test_sampling_flags_become_sampling_params() -> None:
    args = build_parser().parse_args(
        ["generate", "-p", "x", "--temp", "0", "--top-k", "5", "-n", "7", "--ignore-eos"]
    )
    params = sampling_params_from(args)
    assert (params.temperature, params.top_k, params.max_tokens, params.ignore_eos) == (
        0.0,
        5,
        7,
        True,
    )
    assert (params.top_p, params.min_p, params.repetition_penalty) == (0.95, 0.05, 1.0)
    unlimited = sampling_params_from(build_parser().parse_args(["chat", "-n", "-1"]))
    assert unlimited.max_tokens is None


def test_bad_sampling_flag_names_the_field() -> None:
    with pytest.raises(ValueError, match="top_p"):
        sampling_params_from(build_parser().parse_args(["chat", "--top-p", "1.5"]))


def test_conversation_grows_and_clear_keeps_the_system_prompt(tokenizer) -> None:
    chat = Conversation(system="Be brief.")
    chat.add("user", "Hi!")
    first = chat.prompt_token_ids(tokenizer)
    chat.add("assistant", "Hello! How can I help?")
    chat.add("user", "Name a colour.")
    second = chat.prompt_token_ids(tokenizer)
    assert len(second) > len(first)
    assert "Hello! How can I help?" in tokenizer.decode(second, skip_special_tokens=False)
    assert chat.num_turns == 2
    chat.clear()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]
    chat.add("user", "Hi!")
    assert chat.prompt_token_ids(tokenizer) == first
    assert "Be brief." in tokenizer.decode(first, skip_special_tokens=False)


# ------------------------------------------------------------------------ end to end


def _env() -> dict[str, str]:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=root if not path else f"{root}{os.pathsep}{path}")


def _generate(prompt: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """`pagedllm generate -p PROMPT`, greedy, EOS ignored, with the test engine flags."""
    argv = pagedllm_argv("generate", "-p", prompt, "--temp", "0", "--ignore-eos", *flags)
    return subprocess.run(
        [*argv, *ENGINE_FLAGS], capture_output=True, text=True, env=_env(), timeout=600
    )


@pytest.mark.slow
def test_generate_streams_a_completion_then_its_timings() -> None:
    result = _generate("The capital of France is", "-n", "8")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    timings = re.search(STATS + r"([\d.]+) tokens/s", result.stderr)
    assert timings, result.stderr
    assert (int(timings[1]), int(timings[2])) == (5, 8)
    assert float(timings[3]) > 0
    assert "prompt:" not in result.stdout  # timings go to stderr only


@pytest.mark.slow
def test_generate_with_speculation_and_a_quantized_cache_gives_the_same_text() -> None:
    """The engine flags of issues 13 and 14 reach `generate`: the same greedy text with
    n-gram drafts, or the model drafting for itself, as without them (all over an int8
    KV cache)."""
    prompt = "Repeat: the cat sat on the mat. the cat sat on the mat. the cat sat on"

    def run(*extra: str) -> str:
        result = _generate(prompt, "-n", "24", "--kv-cache-dtype", "int8", *extra)
        assert result.returncode == 0, result.stderr
        return result.stdout

    plain = run()
    spec = '{"method": "ngram", "num_speculative_tokens": 4}'
    assert run("--speculative-config", spec) == plain
    draft = json.dumps({"method": "draft_model", "model": str(resolve_model_path(None))})
    assert run("--speculative-config", draft) == plain


def _say(term: Terminal, text: str) -> None:
    """Type a line at the next prompt, as a user who waits for it; skip its echo."""
    term.expect(r"(^|\n)> ")
    term.sendline(text)
    term.expect(re.escape(text) + r"\n")


@pytest.mark.slow
def test_chat_keeps_history_survives_ctrl_c_and_clears() -> None:
    # The exact path: the first answer's first token is a near tie ("The" vs "L", 0.08
    # apart in logprob), which int8 activations flip on some CPUs (an AMD EPYC's AVX-512
    # path answers in French); exact float32 answers as transformers does everywhere.
    argv = pagedllm_argv("chat", "--temp", "0", "-n", "2000", "--exact-matmul", *ENGINE_FLAGS)
    term = Terminal(argv, env=_env())
    try:
        term.expect(r"Chatting with .*/exit")
        _say(term, "What is the capital of France?")
        term.expect(r"Paris")
        first = int(term.expect(STATS)[1])

        _say(term, "And of Italy?")
        term.expect(r"Rome")
        second = int(term.expect(STATS)[1])
        assert second > first + 10  # the first turn and its reply are in the prompt

        # A long reply (greedy decoding loops on this one), stopped once it streams.
        _say(term, "Write a long story about a dragon who learns to fly.")
        term.expect(r"\w+ \w+ \w+")
        term.send("\x03")
        term.expect(r"\(stopped\)")
        stopped = term.expect(STATS)
        assert int(stopped[2]) < 2000
        assert term.proc.poll() is None  # still running, back at the prompt

        _say(term, "What is the capital of Spain?")
        term.expect(r"Madrid")
        after_stop = int(term.expect(STATS)[1])
        assert after_stop > int(stopped[1])  # the stopped turn stayed in the history

        _say(term, "/clear")
        term.expect(r"conversation cleared")
        _say(term, "What is the capital of France?")
        term.expect(r"Paris")
        assert int(term.expect(STATS)[1]) == first  # nothing of the earlier turns is left

        term.expect(r"\n> ")
        term.send("half a line")
        term.expect(r"half a line")  # echoed
        time.sleep(0.5)  # let readline finish with the keys and wait in its select()
        for _ in range(3):
            term.send("\x03")  # at the prompt: the line is dropped with a hint, no exit
            try:
                term.expect(r"/exit or Ctrl-D", timeout=5)
                break
            except AssertionError:
                # CPython's readline acts on a SIGINT only when it interrupts its select():
                # one that lands while it is still handling keys stays pending until the
                # next signal (keys do not wake it). A race no typist hits, but 2 busy
                # cores make it likely: press Ctrl-C again, as a typist would.
                pass
        else:
            raise AssertionError("Ctrl-C at the prompt was never acted on")
        assert term.proc.poll() is None
        _say(term, "/help")  # read as a command: the half line is gone
        term.expect(r"end a line with")
        _say(term, "/exit")
        assert term.wait() == 0
    finally:
        term.close()


@pytest.mark.slow
def test_chat_exits_on_end_of_input() -> None:
    result = subprocess.run(
        pagedllm_argv("chat", "--temp", "0", "-n", "4", *ENGINE_FLAGS),
        input="Hi\n",
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(STATS, result.stderr)
