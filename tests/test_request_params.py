"""scheduler.openai_api.parse_request: what a request's body turns into for generation."""

from __future__ import annotations

import pytest

from models.config import load_config
from models.tokenizer import load_tokenizer
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
