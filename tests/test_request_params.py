"""scheduler.openai_api.parse_request: what a request's body turns into for generation."""

from __future__ import annotations

import pytest

from models.config import load_config
from models.tokenizer import load_tokenizer
from scheduler.errors import ApiError
from scheduler.openai_api import parse_request


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model, load_config(tiny_model))


@pytest.mark.parametrize(("chat", "extra", "keep", "top"), [
    (False, {}, False, 0),
    (False, {"logprobs": 0}, True, 0),
    (False, {"logprobs": 3}, True, 3),
    (True, {}, False, 0),
    (True, {"logprobs": False}, False, 0),
    (True, {"logprobs": True}, True, 0),
    (True, {"logprobs": True, "top_logprobs": 2}, True, 2),
])
def test_the_chosen_tokens_logprob_is_kept_only_when_the_request_wants_logprobs(tokenizer, chat, extra, keep, top):
    body = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    req = parse_request(body | extra, tokenizer, 64, chat)
    assert req.want_logprobs is keep
    assert req.params.keep_logprob is keep and req.params.logprobs == top


def test_chat_template_kwargs_reach_the_template_and_cannot_replace_its_own_variables(tokenizer, qwen3_style_model):
    """vLLM's `chat_template_kwargs` (how clients turn Qwen3's thinking off) become template variables."""
    messages = [{"role": "user", "content": "hi"}]
    plain = parse_request({"messages": messages}, tokenizer, 64, True)
    same = parse_request({"messages": messages, "chat_template_kwargs": {"enable_thinking": False}}, tokenizer, 64, True)
    assert same.prompts == plain.prompts  # a template that does not read it renders the same
    thinking = load_tokenizer(qwen3_style_model, load_config(qwen3_style_model))
    off = parse_request({"messages": messages, "chat_template_kwargs": {"enable_thinking": False}}, thinking, 64, True)
    on = parse_request({"messages": messages}, thinking, 64, True)
    assert thinking.decode_with_special(off.prompts[0]) == thinking.decode_with_special(on.prompts[0]) + \
        "<think>\n\n</think>\n\n"
    for bad in ({"messages": []}, {"add_generation_prompt": False}, {"bos_token": "x"}, {"not a name": 1}):
        with pytest.raises(ApiError, match="may not set"):
            parse_request({"messages": messages, "chat_template_kwargs": bad}, tokenizer, 64, True)
    with pytest.raises(ApiError, match="wrong type"):
        parse_request({"messages": messages, "chat_template_kwargs": ["enable_thinking"]}, tokenizer, 64, True)
