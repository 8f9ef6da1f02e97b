"""Unit tests for the chat template and the rendering of conversations for fine-tuning."""

import numpy as np
import pytest

from crowdtrain.data.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, render, render_many
from crowdtrain.model import Tokenizer

EOT = "<|endoftext|>"
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "  Rome, of course!\n"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    texts = [
        "The quick brown fox jumps over the lazy dog. " * 10,
        "What is the capital of France? The capital of France is Paris. " * 10,
        "<|user|>\nhello\n<|assistant|>\nhi there\n" * 10,
    ]
    return Tokenizer.train(texts, vocab_size=300)


def masked_runs(tokenizer: Tokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The text of each maximal run of masked tokens, in order."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return [
        tokenizer.decode(ids[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2], strict=True)
    ]


def test_render_masks_exactly_the_assistant_responses(tokenizer):
    ids, mask = render(CONVERSATION, tokenizer, DEFAULT_CHAT_TEMPLATE)
    assert ids.dtype == np.uint16 and mask.dtype == np.uint8
    assert ids.shape == mask.shape
    assert set(np.unique(mask)) == {0, 1}
    assert masked_runs(tokenizer, ids, mask) == [
        "The capital of France is Paris.\n",
        "  Rome, of course!\n\n" + EOT,
    ]


def test_render_text_is_the_prompt_then_the_response(tokenizer):
    template = DEFAULT_CHAT_TEMPLATE
    ids, mask = render(CONVERSATION, tokenizer, template)
    expected = template.prompt(CONVERSATION[:-1]) + CONVERSATION[-1]["content"] + "\n" + EOT
    assert tokenizer.decode(ids.tolist()) == expected
    # the unmasked tokens are the headers, the system and user turns, in order
    assert tokenizer.decode(ids[mask == 0].tolist()) == (
        "<|system|>\nYou are a helpful assistant.\n"
        "<|user|>\nWhat is the capital of France?\n<|assistant|>\n"
        "<|user|>\nAnd of Italy?\n<|assistant|>\n"
    )
    assert ids[-1] == tokenizer.eot_id and mask[-1] == 1
    assert np.count_nonzero(ids == tokenizer.eot_id) == 1


def test_render_boundaries_are_exact_for_any_template(tokenizer):
    template = ChatTemplate(system="### S:", user="### Q: ", assistant="### A:", end_of_turn="")
    ids, mask = render(CONVERSATION, tokenizer, template)
    assert masked_runs(tokenizer, ids, mask) == [
        "The capital of France is Paris.",
        "  Rome, of course!\n" + EOT,
    ]
    assert tokenizer.decode(ids.tolist()) == (
        template.prompt(CONVERSATION[:-1]) + CONVERSATION[-1]["content"] + EOT
    )


def test_system_and_user_turns_are_never_targets(tokenizer):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
    ]
    ids, mask = render(conversation, tokenizer, DEFAULT_CHAT_TEMPLATE)
    assert not mask.any()
    assert ids[-1] == tokenizer.eot_id


def test_empty_assistant_content_still_learns_to_stop(tokenizer):
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    ids, mask = render(conversation, tokenizer, DEFAULT_CHAT_TEMPLATE)
    assert masked_runs(tokenizer, ids, mask) == ["\n" + EOT]


def test_render_many_concatenates_renders(tokenizer):
    other = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi there"}]
    ids, mask = render_many([CONVERSATION, other], tokenizer, DEFAULT_CHAT_TEMPLATE)
    first_ids, first_mask = render(CONVERSATION, tokenizer, DEFAULT_CHAT_TEMPLATE)
    second_ids, second_mask = render(other, tokenizer, DEFAULT_CHAT_TEMPLATE)
    np.testing.assert_array_equal(ids, np.concatenate([first_ids, second_ids]))
    np.testing.assert_array_equal(mask, np.concatenate([first_mask, second_mask]))
    empty_ids, empty_mask = render_many([], tokenizer, DEFAULT_CHAT_TEMPLATE)
    assert empty_ids.dtype == np.uint16 and len(empty_ids) == 0 and len(empty_mask) == 0


def test_render_rejects_an_unknown_role(tokenizer):
    with pytest.raises(ValueError, match="unknown chat role 'tool'"):
        render([{"role": "tool", "content": "x"}], tokenizer, DEFAULT_CHAT_TEMPLATE)


def test_prompt_ends_with_the_assistant_header():
    prompt = DEFAULT_CHAT_TEMPLATE.prompt(CONVERSATION[:2])
    assert prompt == (
        "<|system|>\nYou are a helpful assistant.\n"
        "<|user|>\nWhat is the capital of France?\n<|assistant|>\n"
    )
    assert DEFAULT_CHAT_TEMPLATE.prompt([]) == "<|assistant|>\n"


def test_template_dict_round_trip():
    template = ChatTemplate(system="S: ", user="U: ", assistant="A: ", end_of_turn="\n\n")
    assert ChatTemplate.from_dict(template.to_dict()) == template
    assert ChatTemplate.from_dict(DEFAULT_CHAT_TEMPLATE.to_dict()) == DEFAULT_CHAT_TEMPLATE
    assert ChatTemplate.from_dict({}) == DEFAULT_CHAT_TEMPLATE
    assert set(template.to_dict()) == {"system", "user", "assistant", "end_of_turn"}


@pytest.mark.parametrize(
    "d, bad_key",
    [
        ({"assistent": "A: "}, "assistent"),
        ({"user": 3}, "user"),
        ({"end_of_turn": None}, "end_of_turn"),
        ({"system": ""}, "system"),
        ({"user": "<|assistant|>\n"}, "assistant"),
        ({"end_of_turn": EOT}, "end_of_turn"),
    ],
)
def test_template_from_dict_rejects_bad_dicts(d, bad_key):
    with pytest.raises(ValueError, match=bad_key):
        ChatTemplate.from_dict(d)


def test_template_from_dict_rejects_a_non_dict():
    with pytest.raises(ValueError, match="expects a dict"):
        ChatTemplate.from_dict(["user"])  # type: ignore[arg-type]
