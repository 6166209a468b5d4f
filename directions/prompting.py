"""Turning chat messages into prompt token ids: the one chat-template path.

The server, ``frankly extract`` and ``frankly eval`` all call
:func:`chat_prompt_ids`, so directions are extracted at exactly the
positions the hooks will see (Qwen and SmolLM templates inject a default
system prompt when none is given).
"""

from __future__ import annotations


class PromptError(ValueError):
    """Messages the chat template cannot render."""


def chat_prompt_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Render ``messages`` with the model's chat template and return token ids."""
    if getattr(tokenizer, "chat_template", None):
        try:
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
            )
        except Exception as e:  # jinja raises TemplateError and friends for bad input
            raise PromptError(f"chat template failed: {e}") from e
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    # No template: a plain transcript.
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant:" if add_generation_prompt else "")
    return list(tokenizer(text)["input_ids"])


def user_prompt_ids(tokenizer, instruction: str, system: str | None = None) -> list[int]:
    """Prompt ids for one user instruction (optionally with a system prompt)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
    return chat_prompt_ids(tokenizer, msgs)
