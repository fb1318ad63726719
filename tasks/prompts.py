"""How a problem's prompt text becomes the token ids the policy sees (docs/rewards.md, "Prompt formats").

Base models read the prompt as raw text (the default). Instruct and thinking models expect their chat template:
with ``data.chat_template: true`` the prompt becomes one user message, after an optional system message, and the
tokenizer's own template renders it with the generation prompt that opens the assistant's turn.
``data.chat_template_kwargs`` goes to the template (``enable_thinking: false`` for Qwen3, for instance).

The rollout workers encode with :func:`encode_prompts` and return the ids with each batch, so the learner and the
critics train on exactly the tokens the policy was given; the driver's checks before a run encode the same way.

No Ray import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PromptFormat", "encode_prompts", "missing_chat_template"]


@dataclass(frozen=True)
class PromptFormat:
    """``data.chat_template``, ``data.system_prompt`` and ``data.chat_template_kwargs``."""

    chat_template: bool = False
    system_prompt: str | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)

    def messages(self, prompt: str) -> list[dict[str, str]]:
        """The conversation the chat template renders for ``prompt``."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": prompt}]


def encode_prompts(tokenizer, prompts: list[str], prompt_format: PromptFormat = PromptFormat()) -> list[list[int]]:
    """Token ids of each prompt: the raw text with the tokenizer's special tokens (e.g. BOS), or the chat template's
    rendering (which places its own special tokens) ending in the assistant's generation prompt. One batch call
    either way. ``ValueError`` when a chat template is asked for and the tokenizer has none."""
    if not prompt_format.chat_template:
        return [list(ids) for ids in tokenizer(prompts)["input_ids"]]
    missing = missing_chat_template(tokenizer, prompt_format)
    if missing:
        raise ValueError(f"data.chat_template: {missing}")
    encoded = tokenizer.apply_chat_template(
        [prompt_format.messages(prompt) for prompt in prompts], add_generation_prompt=True, tokenize=True,
        return_dict=True, **prompt_format.template_kwargs,
    )
    return [list(ids) for ids in encoded["input_ids"]]


def missing_chat_template(tokenizer, prompt_format: PromptFormat) -> str | None:
    """Why ``prompt_format`` cannot be rendered with ``tokenizer`` (a chat template asked for, none in the tokenizer),
    or None when it can."""
    if prompt_format.chat_template and not getattr(tokenizer, "chat_template", None):
        return (f"the tokenizer of {tokenizer.name_or_path!r} has no chat template "
                "(a base model: leave data.chat_template false)")
    return None
