import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders
from tokenizers.models import WordLevel

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.sampling_params import SamplingParams

PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"
WORDS = ["hello", "world", " ", "  ", "\n", "the", "Zürich", "naïve", "déjà", "vu", "!", ",",
         "👋", "👋🏽", "🇫🇷", "👨‍👩‍👧", "🙂", "世界", "你好", "日本語", "テスト", "한국어", "ΑΒΓ",
         "<|im_end|>", "x+y=z", "…", "€100"]  # fmt: skip
texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=25).map("".join)
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def encode(hf_tokenizer, text):
    return hf_tokenizer.encode(text, add_special_tokens=False)


def stream(hf_tokenizer, ids, chunks=None, prompt=PROMPT, **params):
    """Feed ids in chunks of the given sizes (default one by one); return detok, deltas."""
    detok = IncrementalDetokenizer(
        hf_tokenizer, encode(hf_tokenizer, prompt), SamplingParams(**params)
    )
    chunks = chunks or [1] * len(ids)
    deltas, start = [], 0
    for i, size in enumerate(chunks):
        last = i == len(chunks) - 1
        update = detok.update(ids[start : start + size], finished=last)
        deltas.append(update.delta_text)
        start += size
        if update.stop_string is not None:
            break
    return detok, deltas


def random_chunks(n, rnd):
    chunks = []
    while n > 0:
        chunks.append(min(n, rnd.randint(1, 4)))
        n -= chunks[-1]
    return chunks


@SETTINGS
@given(text=texts, skip=st.booleans(), seed=st.integers(0, 2**16))
def test_incremental_text_equals_full_decode(hf_tokenizer, text, skip, seed):
    ids = encode(hf_tokenizer, text)
    expected = hf_tokenizer.decode(ids, skip_special_tokens=skip)
    for chunks in (None, random_chunks(len(ids), random.Random(seed))):
        detok, deltas = stream(hf_tokenizer, ids, chunks, skip_special_tokens=skip)
        assert "".join(deltas) == detok.output_text == expected
        assert all("\ufffd" not in delta for delta in deltas)


def test_emoji_split_over_tokens_waits_for_whole_character(hf_tokenizer):
    ids = encode(hf_tokenizer, "Hi 👋🏽!")
    assert len(ids) > 4  # the emoji really is split over several byte-level tokens
    detok = IncrementalDetokenizer(hf_tokenizer, [], SamplingParams())
    deltas = [detok.update([i]).delta_text for i in ids]
    assert "".join(deltas) == "Hi 👋🏽!"
    assert "" in deltas  # some tokens completed nothing
    assert all("\ufffd" not in d for d in deltas)


def test_skip_special_tokens(hf_tokenizer):
    ids = encode(hf_tokenizer, "a<|im_end|>b")
    assert stream(hf_tokenizer, ids)[0].output_text == "ab"
    kept = stream(hf_tokenizer, ids, skip_special_tokens=False)[0].output_text
    assert kept == "a<|im_end|>b"


def test_stop_string_cuts_and_is_excluded(hf_tokenizer):
    ids = encode(hf_tokenizer, "The answer is 42. STOP and more text")
    detok, deltas = stream(hf_tokenizer, ids, stop=["STOP"])
    assert detok.output_text == "The answer is 42. "
    assert "".join(deltas) == detok.output_text
    assert detok.stop_string == "STOP" and detok.finished


def test_stop_string_included_on_request(hf_tokenizer):
    ids = encode(hf_tokenizer, "The answer is 42. STOP and more text")
    detok, deltas = stream(hf_tokenizer, ids, stop=["STOP"], include_stop_str_in_output=True)
    assert detok.output_text == "The answer is 42. STOP"
    assert "".join(deltas) == detok.output_text


def test_earliest_stop_string_wins(hf_tokenizer):
    ids = encode(hf_tokenizer, "one two three four")
    detok, _ = stream(hf_tokenizer, ids, chunks=[len(ids)], stop=["four", "two"])
    assert detok.output_text == "one " and detok.stop_string == "two"


def test_stop_string_spanning_tokens_is_caught(hf_tokenizer):
    ids = encode(hf_tokenizer, "alpha beta gamma delta")
    stop = "ta gam"
    pieces = [hf_tokenizer.decode([i]) for i in ids]
    assert stop not in pieces and not any(stop in p for p in pieces)
    detok, deltas = stream(hf_tokenizer, ids, stop=[stop])
    assert detok.output_text == "alpha be"
    assert detok.stop_string == stop
    assert "".join(deltas) == "alpha be"


@SETTINGS
@given(text=texts, data=st.data())
def test_deltas_never_reveal_a_stop_string_prefix(hf_tokenizer, text, data):
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start : start + data.draw(st.integers(1, 6))]
    ids = encode(hf_tokenizer, text)
    detok, deltas = stream(hf_tokenizer, ids, stop=[stop], skip_special_tokens=False)
    first = text.find(stop)
    decoded = hf_tokenizer.decode(ids)
    if decoded == text and first != -1:  # the stop string is found where the text has it
        assert detok.stop_string == stop
        assert detok.output_text == text[:first]
    # Whatever was streamed is final: it is a prefix of the final text and never
    # runs into where the stop string began.
    sent = ""
    for delta in deltas:
        sent += delta
        assert detok.output_text.startswith(sent)
    assert sent == detok.output_text


def test_held_back_text_is_released_when_request_finishes(hf_tokenizer):
    ids = encode(hf_tokenizer, "wait for it: STO")
    detok = IncrementalDetokenizer(hf_tokenizer, [], SamplingParams(stop=["STOP"]))
    sent = "".join(detok.update([i]).delta_text for i in ids)
    assert sent == "wait for it: "  # "STO" could still become "STOP"
    final = detok.update([], finished=True)
    assert final.delta_text == "STO" and final.stop_string is None


def test_no_stop_string_before_min_tokens(hf_tokenizer):
    ids = encode(hf_tokenizer, "ab ab ab ab ab ab")
    assert len(ids) == 6  # one token per "ab"
    detok, deltas = stream(hf_tokenizer, ids, stop=["ab"], min_tokens=3)
    assert detok.stop_string == "ab"
    assert detok.output_text == "".join(deltas) == "ab ab ab "


def test_stream_cut_inside_a_character_ends_like_full_decode(hf_tokenizer):
    ids = encode(hf_tokenizer, "ok 👋🏽")[:-1]  # max_tokens hit in the middle of the emoji
    detok = IncrementalDetokenizer(hf_tokenizer, [], SamplingParams())
    deltas = [detok.update([i]).delta_text for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    deltas.append(detok.update([], finished=True).delta_text)
    assert "".join(deltas) == detok.output_text == hf_tokenizer.decode(ids)
    assert detok.output_text.endswith("\ufffd")


def test_stop_token_text_left_out(hf_tokenizer):
    ids = encode(hf_tokenizer, "done.")
    period = ids[-1]
    detok = IncrementalDetokenizer(hf_tokenizer, [], SamplingParams(stop_token_ids=[period]))
    for i in ids[:-1]:
        detok.update([i])
    detok.update([period], stopped_on_token=True)
    assert detok.output_text == "done" and detok.output_token_ids == ids
    detok = IncrementalDetokenizer(
        hf_tokenizer, [], SamplingParams(stop_token_ids=[period], include_stop_str_in_output=True)
    )
    detok.update(ids[:-1])
    detok.update([period], stopped_on_token=True)
    assert detok.output_text == "done."


def test_first_token_decoded_in_prompt_context():
    # A SentencePiece-style decoder drops the leading space of the first token it
    # sees; decoded after the prompt's last tokens, the output keeps its space.
    vocab = {"<unk>": 0, "▁Hello": 1, "▁there": 2}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Metaspace()
    assert tok.decode([2]) == "there"
    detok = IncrementalDetokenizer(tok, [1], SamplingParams())
    assert detok.update([2]).delta_text == " there"
    assert IncrementalDetokenizer(tok, [], SamplingParams()).update([2]).delta_text == "there"


@settings(max_examples=200, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="ab", min_size=1, max_size=6), min_size=1, max_size=4),
    pieces=st.lists(st.text(alphabet="abc", max_size=5), max_size=12),
)
def test_held_back_tail_is_the_longest_stop_prefix_the_text_ends_with(stops, pieces):
    from pagedllm.engine.detokenizer import _StopPrefixes

    tracker = _StopPrefixes(stops)
    text = ""
    for piece in pieces:
        text += piece
        tracker.feed(piece)
        expected = max(
            (k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0
        )
        assert tracker.longest == expected
