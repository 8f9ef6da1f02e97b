"""Chat inference pieces without a server: incremental decoding, stop texts, prompts, and the
torch thread limit of the workers."""

from __future__ import annotations

import threading

import pytest
import torch

from crowdtrain.data.chat import DEFAULT_CHAT_TEMPLATE, render
from crowdtrain.model.tokenizer import Tokenizer
from crowdtrain.server.inference import TextStream, _limit_torch_threads, prompt_ids


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    # ASCII only: every byte of a multi-byte character is a token of its own
    return Tokenizer.train(["hello world, the cat sat on the mat\n"] * 20, 300)


def pieces(tokenizer: Tokenizer, text: str) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, DEFAULT_CHAT_TEMPLATE)
    out = [stream.add(token) for token in tokenizer.encode(text)]
    out.append(stream.flush())
    return [piece for piece in out if piece], stream


def test_multi_byte_characters_come_out_whole(tokenizer):
    text = "naïve 日本語 ok"
    assert len(tokenizer.encode("日")) == 3
    out, _ = pieces(tokenizer, text)
    assert "".join(out) == text
    assert all("\ufffd" not in piece for piece in out)
    assert "日" in out or any("日" in piece for piece in out)


def test_the_text_ends_where_the_model_starts_another_turn(tokenizer):
    out, stream = pieces(tokenizer, "the cat sat\n<|user|>\nand more")
    assert "".join(out) == "the cat sat"
    assert stream.stopped


def test_a_header_without_end_of_turn_also_stops(tokenizer):
    out, stream = pieces(tokenizer, "hello<|assistant|>\nmore")
    assert "".join(out) == "hello" and stream.stopped


def test_text_that_only_looks_like_a_header_start_is_released(tokenizer):
    out, stream = pieces(tokenizer, "a <|use and\nthen")
    assert "".join(out) == "a <|use and\nthen" and not stream.stopped
    out, _ = pieces(tokenizer, "ends with\n<|us")  # held back until the end, then shown
    assert "".join(out) == "ends with\n<|us"


def test_prompt_is_the_training_rendering_then_the_assistant_header(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids, _ = render(messages, tokenizer, DEFAULT_CHAT_TEMPLATE)
    prompt = prompt_ids(messages, tokenizer, DEFAULT_CHAT_TEMPLATE)
    assert prompt[0] == tokenizer.eot_id
    assert prompt[1 : len(ids)] == [int(i) for i in ids[:-1]]
    assert tokenizer.decode(prompt[len(ids) :]) == DEFAULT_CHAT_TEMPLATE.assistant


def test_the_thread_limit_leaves_other_threads_alone():
    """torch.set_num_threads sets the calling thread's count and the default of threads that
    start later; a chat worker must change only its own."""
    before = torch.get_num_threads()
    seen: dict[str, int] = {}

    def worker() -> None:
        _limit_torch_threads(1)
        seen["worker"] = torch.get_num_threads()

    def fresh(key: str) -> None:
        seen[key] = torch.get_num_threads()

    for target, args in ((fresh, ("earlier",)), (worker, ()), (fresh, ("later",))):
        thread = threading.Thread(target=target, args=args)
        thread.start()
        thread.join()
    assert seen["worker"] == 1
    assert torch.get_num_threads() == before
    assert seen["later"] == seen["earlier"]
