"""The one chat-template path: with a template, without one, and a template that fails."""

from __future__ import annotations

import pytest

from directions.prompting import PromptError, chat_prompt_ids, user_prompt_ids
from tests.tiny_models import tiny_tokenizer


def test_chat_template_renders_the_messages():
    tok = tiny_tokenizer()
    ids = chat_prompt_ids(tok, [{"role": "user", "content": "t5 t6"}])
    assert ids == tok("<s> t5 t6 </s>")["input_ids"]
    assert user_prompt_ids(tok, "t5 t6") == ids
    with_system = user_prompt_ids(tok, "t5 t6", system="t9")
    assert with_system == tok("<s> t9 </s> <s> t5 t6 </s>")["input_ids"]


def test_without_a_template_a_plain_transcript():
    class Plain:
        chat_template = None

        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    ids = chat_prompt_ids(Plain(), [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}])
    assert "".join(map(chr, ids)) == "system: S\nuser: hi\nassistant:"
    ids = chat_prompt_ids(Plain(), [{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert "".join(map(chr, ids)) == "user: hi\n"


def test_a_template_error_is_a_prompt_error():
    tok = tiny_tokenizer()
    tok.chat_template = "{{ raise_exception('no system messages') }}"
    with pytest.raises(PromptError, match="chat template failed"):
        chat_prompt_ids(tok, [{"role": "user", "content": "t5"}])
