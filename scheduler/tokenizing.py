"""`POST /tokenize` and `POST /detokenize` as vLLM serves them (llama.cpp's field names are taken
too): how many tokens a prompt or a conversation takes, and the text of token ids, without
generating. Clients count tokens with them before they send a request (SillyTavern, trimmers of
chat history); under `--api-key` they need the key, as /v1 does."""

from __future__ import annotations

from aiohttp import web

from scheduler import openai_api as api
from scheduler.errors import ApiError
from scheduler.fields import typed, valid_text
from scheduler.state import ENGINE, SETTINGS

MAX_DETOKENIZE = 1 << 20  # token ids in one /detokenize body


async def _body(request: web.Request) -> dict:
    settings = request.app[SETTINGS]
    body = await api.read_json_object(request, settings.body_timeout)
    api.check_model(body, settings.served_name)
    return body


async def tokenize(request: web.Request) -> web.Response:
    """{"prompt": text} (vLLM; llama.cpp: "content") or {"messages": [...]} (rendered with the chat
    template, `add_generation_prompt` true unless said, `chat_template_kwargs`) -> {"tokens",
    "count", "max_model_len"}, and "token_strs" with `return_token_strs` (llama.cpp: `with_pieces`)."""
    engine, body = request.app[ENGINE], await _body(request)
    tokenizer = engine.tokenizer
    if "messages" in body:
        text = tokenizer.render_chat(api.parse_messages(body), typed(body, "add_generation_prompt", bool, True),
                                     api.template_kwargs(body))
        special = typed(body, "add_special_tokens", bool, False)  # the template wrote them
    else:
        key = "prompt" if "prompt" in body or "content" not in body else "content"
        text = typed(body, key, str, None)
        if text is None:
            raise ApiError(400, "give 'prompt' (or 'content') as a string, or 'messages'", param="prompt")
        valid_text(text, key)
        special = typed(body, "add_special_tokens", bool, typed(body, "add_special", bool, key == "prompt"))
    ids = tokenizer.encode(text, add_special_tokens=special)
    answer = {"tokens": ids, "count": len(ids), "max_model_len": engine.config.max_position_embeddings}
    if typed(body, "return_token_strs", bool, False) or typed(body, "with_pieces", bool, False):
        answer["token_strs"] = [tokenizer.token_text(t) for t in ids]
    return web.json_response(answer)


async def detokenize(request: web.Request) -> web.Response:
    """{"tokens": [ids]} -> {"prompt": text} (vLLM), also as "content" (llama.cpp); special tokens kept."""
    engine, body = request.app[ENGINE], await _body(request)
    ids = typed(body, "tokens", list, None)
    vocab = engine.config.vocab_size
    if ids is None or len(ids) > MAX_DETOKENIZE or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise ApiError(400, f"'tokens' must be a list of token ids in 0..{vocab - 1}", param="tokens")
    text = engine.tokenizer.decode_with_special(ids)
    return web.json_response({"prompt": text, "content": text})
