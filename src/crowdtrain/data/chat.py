"""The chat template, and conversations rendered to token ids with a loss mask for fine-tuning."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from crowdtrain import records
from crowdtrain.data.batches import token_dtype
from crowdtrain.model.tokenizer import EOT_TOKEN

if TYPE_CHECKING:
    from crowdtrain.model.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation becomes text; stored with the tokenizer (as JSON) so server, nodes and
    the chat page agree. Each turn is its role's header, the content, then end_of_turn."""

    system: str = "<|system|>\n"  # header of a system turn
    user: str = "<|user|>\n"  # header of a user turn
    assistant: str = "<|assistant|>\n"  # header of an assistant turn
    end_of_turn: str = "\n"  # text after every turn's content; may be empty

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, str):
                raise ValueError(f"ChatTemplate.{field.name} must be a string, got {value!r}")
            # the tokenizer turns this text into the eot token, which ends a document
            if EOT_TOKEN in value:
                raise ValueError(f"ChatTemplate.{field.name} must not contain {EOT_TOKEN}")
        seen: dict[str, str] = {}
        for role in ROLES:
            header = getattr(self, role)
            if not header:
                raise ValueError(f"ChatTemplate.{role} must be a non-empty header")
            if header in seen:
                raise ValueError(
                    f"ChatTemplate.{role} is the same header as {seen[header]} ({header!r}); "
                    "each role needs its own"
                )
            seen[header] = role

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, str]) -> ChatTemplate:
        """Build a template from a dict, e.g. the tokenizer's; unknown keys are an error."""
        return records.from_dict(cls, d)

    def header(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown chat role {role!r}; expected one of {', '.join(ROLES)}")
        return getattr(self, role)

    def prompt(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The conversation so far, then the assistant header: the text to generate from."""
        turns = [self.header(m["role"]) + m["content"] + self.end_of_turn for m in messages]
        return "".join(turns) + self.assistant


DEFAULT_CHAT_TEMPLATE = ChatTemplate()


def render(
    messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer, template: ChatTemplate
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask of one conversation, which ends with the eot token.

    Messages have a role (system, user or assistant) and str content, validated by the importer.
    Header, content and end_of_turn are tokenized apart so the mask boundaries are exact. The
    mask is 1 on each assistant content and its end_of_turn, and on the final eot when the last
    turn is the assistant's (so the model learns to stop); 0 on headers, system and user turns.
    """
    return render_many([messages], tokenizer, template)


def render_many(
    conversations: Sequence[Sequence[Mapping[str, str]]],
    tokenizer: Tokenizer,
    template: ChatTemplate,
) -> tuple[np.ndarray, np.ndarray]:
    """render() of each conversation, concatenated: ids (uint16 or uint32) and mask (uint8)."""
    pieces: list[tuple[str | None, bool]] = []  # (text, is a target); None stands for eot
    for messages in conversations:
        for message in messages:
            is_assistant = message["role"] == "assistant"
            pieces.append((template.header(message["role"]), False))
            pieces.append((message["content"], is_assistant))
            pieces.append((template.end_of_turn, is_assistant))
        ends_with_assistant = bool(messages) and messages[-1]["role"] == "assistant"
        pieces.append((None, ends_with_assistant))
    # one batched call: tokenizing piece by piece from Python would dominate a large import
    encoded = iter(tokenizer.encode_batch([text for text, _ in pieces if text is not None]))
    ids: list[int] = []
    mask: list[bool] = []
    for text, is_target in pieces:
        piece_ids = [tokenizer.eot_id] if text is None else next(encoded)
        ids += piece_ids
        mask += [is_target] * len(piece_ids)
    return np.array(ids, dtype=token_dtype(tokenizer.vocab_size)), np.array(mask, dtype=np.uint8)
