"""Incremental detokenization of one request's output, with stop strings.

Tokens arrive a few at a time; the text the user sees must grow by deltas whose
concatenation is the final text. Two things make that harder than decoding each
token: a character may be split over several byte-level tokens (nothing is sent
until it is whole, never a U+FFFD for a partial character), and a stop string
may arrive over several steps (characters that could be the start of one are
held back until they are known not to be, so a client never sees text that is
later cut). How much to hold back is kept up to date by one KMP automaton per stop
string, so each update costs time in its new characters only, however long the
stop strings are.

Decoding follows vLLM's prefix/read offsets: each step decodes a short window
of recent tokens and keeps what it adds beyond the window's already-read part,
so the cost per token does not grow with the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pagedllm.sampling_params import SamplingParams

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded ahead of the output, so that the first output token is
# decoded in context (e.g. a SentencePiece leading space is kept, as in vLLM).
_PROMPT_CONTEXT_TOKENS = 5


@dataclass
class DetokenizerUpdate:
    """What one ``update`` adds: new text for the client, and the stop string hit."""

    delta_text: str
    stop_string: str | None = None


class IncrementalDetokenizer:
    """Turns one request's output tokens into text, step by step.

    ``tokenizer`` is a ``transformers.PreTrainedTokenizerFast`` or a
    ``tokenizers.Tokenizer``. Stop strings count only once the output has more
    than ``params.min_tokens`` tokens, and a match must end in text produced by
    the current update, so each check scans the new text plus
    (longest stop string - 1) characters.
    """

    def __init__(
        self, tokenizer: object, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self._tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self._skip_special_tokens = params.skip_special_tokens
        self._stop = list(params.stop)
        self._stop_prefixes = _StopPrefixes(self._stop)
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens

        context = self._prompt_context(prompt_token_ids)
        self._ids = context  # the decoding window's tokens and all before it
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)

        self.output_token_ids: list[int] = []
        # All text decoded so far, cut at the stop string once one matched. Until
        # the request finishes it may run ahead of the deltas by the held-back tail.
        self.output_text = ""
        self.stop_string: str | None = None
        self.finished = False
        self._sent = 0  # characters of output_text already returned as deltas
        self._stop_check_from = 0  # stop strings must end after this offset

    def update(
        self,
        new_token_ids: Sequence[int],
        *,
        finished: bool = False,
        stopped_on_token: bool = False,
    ) -> DetokenizerUpdate:
        """Append sampled tokens; return the text that may now be sent.

        ``finished``: the request ends with these tokens for a reason outside this
        class (max_tokens, EOS, a stop token), so nothing is held back any more.
        ``stopped_on_token``: the last token is the EOS or stop token that ended
        the request; as in vLLM its text is left out unless
        ``include_stop_str_in_output``.
        """
        if self.finished:
            return DetokenizerUpdate("")
        finished = finished or stopped_on_token
        new_token_ids = list(new_token_ids)
        self.output_token_ids.extend(new_token_ids)
        if stopped_on_token and not self._include_stop and new_token_ids:
            new_token_ids.pop()

        checked_upto = len(self.output_text)
        num_outputs = len(self.output_token_ids) - len(new_token_ids)
        for token_id in new_token_ids:
            self._ids.append(token_id)
            self.output_text += self._decode_next()
            num_outputs += 1
            if num_outputs <= self._min_tokens:
                self._stop_check_from = len(self.output_text)
        if finished:
            self.output_text += self._flush()
        self._stop_prefixes.feed(self.output_text[checked_upto:])

        stop = self._find_stop(max(checked_upto, self._stop_check_from))
        if stop is not None:
            self.stop_string, cut = stop
            # Held-back text is never sent, so the cut never falls inside sent text.
            self.output_text = self.output_text[: max(cut, self._sent)]
            finished = True

        held = self._stop_prefixes.longest
        end = len(self.output_text) if finished else len(self.output_text) - held
        delta = self.output_text[self._sent : end]
        self._sent = max(self._sent, end)
        self.finished = finished
        return DetokenizerUpdate(delta, self.stop_string)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_next(self) -> str:
        """Text the newest token completes; empty while a character is still partial."""
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(self._prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return delta

    def _flush(self) -> str:
        """At the end, whatever is pending, even bytes that never became a character."""
        if self._read_offset == len(self._ids):
            return ""
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._read_offset = len(self._ids)
        return new_text[len(self._prefix_text) :]

    def _find_stop(self, check_from: int) -> tuple[str, int] | None:
        """The earliest stop string ending after ``check_from``, and where to cut."""
        text = self.output_text
        if not self._stop or check_from >= len(text):
            return None
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = text.find(stop, max(0, check_from - len(stop) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        index, stop = best
        return stop, index + len(stop) if self._include_stop else index

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The last few prompt tokens, if they decode cleanly (no partial character)."""
        for size in range(min(_PROMPT_CONTEXT_TOKENS, len(prompt_token_ids)), 0, -1):
            context = list(prompt_token_ids[-size:])
            if _REPLACEMENT not in self._decode(context):
                return context
        return []


class _StopPrefixes:
    """The longest tail of the text so far that is a proper prefix of some stop string.

    One Knuth-Morris-Pratt automaton per stop string, fed each new character once:
    its state is the length of the longest tail of the text that begins the string.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = list(stops)
        self._failure = [_failure_table(stop) for stop in self._stops]
        self._states = [0] * len(self._stops)

    @property
    def longest(self) -> int:
        return max(self._states, default=0)

    def feed(self, text: str) -> None:
        if not text:
            return
        for i, stop in enumerate(self._stops):
            state, failure, full = self._states[i], self._failure[i], len(stop)
            for char in text:
                while state and stop[state] != char:
                    state = failure[state - 1]
                if stop[state] == char:
                    state += 1
                if state == full:  # a whole match: keep only its longest proper border
                    state = failure[state - 1]
            self._states[i] = state


def _failure_table(pattern: str) -> list[int]:
    """failure[i]: length of the longest proper prefix of pattern[: i + 1] that is also its suffix."""
    failure = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = failure[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        failure[i] = k
    return failure
