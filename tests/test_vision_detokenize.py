"""Incremental detokenization (vision/detokenize.py): what it streams adds up to the whole answer's decode."""

from __future__ import annotations

import random

import pytest

from tests.vision_fixtures import tiny_tokenizer
from vision.detokenize import IncrementalDetokenizer

TEXTS = ["The capital of France is Paris.", "naïve café — 3×4 = 12 ✓ 🙂🙂 ok", "  spaces\tand\nnew lines  ",
         "日本語のテキストと emoji 🚀 mixed", "red green blue yellow one two three four"]


@pytest.fixture(scope="module", params=["tiny-bpe", "smollm2"])
def tokenizer(request):
    if request.param == "tiny-bpe":
        return tiny_tokenizer()  # byte-level: multi-byte characters split across tokens
    from transformers import AutoTokenizer

    from lm.loading import _smollm2_cache

    return AutoTokenizer.from_pretrained(_smollm2_cache(), local_files_only=True)


def stream(tokenizer, ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(t) for t in ids]
    pieces.append(detok.flush())
    return pieces, detok.text


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_add_up_to_the_whole_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, total = stream(tokenizer, ids)
    assert "".join(pieces) == total == tokenizer.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)  # a character is sent whole, never as a replacement mark


def test_random_token_runs_match_the_whole_decode(tokenizer):
    rng = random.Random(0)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    for _ in range(200):
        ids = [rng.choice(vocab) for _ in range(rng.randint(1, 24))]
        pieces, total = stream(tokenizer, ids)
        assert "".join(pieces) == total
        assert total == tokenizer.decode(ids, skip_special_tokens=True)  # invalid byte runs included


def test_special_tokens_are_skipped(tokenizer):
    ids = tokenizer("one two", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    _, total = stream(tokenizer, [ids[0], eos] + ids[1:])
    assert total == tokenizer.decode([ids[0], eos] + ids[1:], skip_special_tokens=True)


def _answer(service, ids: list[int], stop: tuple[str, ...]) -> tuple[list[str], str]:
    import threading

    from vision.scheduler import GenRequest, SamplingParams

    deltas, done, end = [], threading.Event(), []

    def emit(ev):
        if ev.kind == "delta":
            deltas.append(ev.text)
        elif ev.kind in ("done", "error"):
            end.append(ev.finish_reason or ev.code)
            done.set()

    prompt = service.model.build_prompt([{"role": "user", "content": "x"}], [])
    prompt.pieces = [ids]
    service.scheduler.submit(GenRequest("r", None, prompt, SamplingParams(max_tokens=24, stop=stop, ignore_eos=True),
                                        emit))
    assert done.wait(60)
    return deltas, end[0]


def test_a_stop_string_cuts_the_streamed_answer_and_is_never_sent():
    from tests.test_vision_serving import make_service
    from tests.vision_fixtures import tiny_llama

    tok = tiny_tokenizer()
    service = make_service((tok, tiny_llama(len(tok)), {}, None), slots=1)
    ids = [15, 16, 17, 18]
    service.scheduler.start()
    try:
        deltas, finish = _answer(service, ids, ())
        full = "".join(deltas)
        assert finish == "length" and len(full) > 6
        stop = full[len(full) // 2:len(full) // 2 + 3]  # three characters from the middle of the answer
        deltas, finish = _answer(service, ids, (stop,))
    finally:
        service.scheduler.stop()
    assert finish == "stop" and "".join(deltas) == full[:full.find(stop)]
    assert all(stop not in d for d in deltas)
