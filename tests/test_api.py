"""The OpenAI-compatible API of a live 2-worker cluster, driven by the official `openai` package."""

import asyncio
import io
import json
import re

import aiohttp
import openai
import psutil
import pytest
import torch
import transformers
from cluster_proc import ClusterProcess
from hf_reference import hf_greedy, make_hf_checkpoint

from models.config import load_config
from models.tokenizer import load_tokenizer

API_KEY = "k-" + "z" * 20


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama", "llama", seed=6)


@pytest.fixture(scope="module")
def cluster(model, tmp_path_factory):
    proc = ClusterProcess(model, 2, tmp_path_factory.mktemp("cluster"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def busy_cluster(model, tmp_path_factory):
    """Two generation slots, a queue of four, and an API key."""
    proc = ClusterProcess(model, 2, tmp_path_factory.mktemp("busy"), "--max-running", "2",
                          "--max-queue", "4", "--api-key", API_KEY)
    yield proc
    proc.stop()


def client(cluster, key="none") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
async def oai(cluster):
    async with client(cluster) as c:
        yield c


@pytest.fixture
async def busy_oai(busy_cluster):
    async with client(busy_cluster, API_KEY) as c:
        yield c


async def test_models_lists_the_served_name(oai, model):
    models = await oai.models.list()
    assert [m.id for m in models.data] == [model.name]


async def test_models_retrieve_names_the_served_model_or_404s(oai, model):
    card = await oai.models.retrieve(model.name)
    assert card.id == model.name and card.object == "model"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        await oai.models.retrieve("gpt-4/turbo")


async def test_streamed_text_equals_whole_text_for_the_same_seed(cluster, oai):
    c = oai
    args = dict(model=cluster.model.name, prompt="The quick brown fox", max_tokens=30, temperature=0.9,
                top_p=0.95, seed=1234)
    whole = await c.completions.create(**args)
    pieces = [chunk.choices[0].text async for chunk in await c.completions.create(**args, stream=True)
              if chunk.choices]
    assert "".join(pieces) == whole.choices[0].text
    assert whole.usage.completion_tokens == 30 or whole.choices[0].finish_reason == "stop"
    other = await c.completions.create(**(args | {"seed": 99}))
    assert other.choices[0].text != whole.choices[0].text  # the seed matters


async def test_chat_greedy_equals_transformers(oai, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    prompt_ids = load_tokenizer(model, load_config(model)).encode_chat(messages)
    ref_tokens, ref_logprobs = hf_greedy(model, prompt_ids, 20)
    c = oai
    resp = await c.chat.completions.create(model=model.name, messages=messages, max_tokens=20, temperature=0,
                                           logprobs=True, top_logprobs=2,
                                           extra_body={"return_token_ids": True})
    choice = resp.choices[0]
    assert choice.model_extra["token_ids"] == ref_tokens
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(ref_logprobs, abs=1e-4)
    stream = await c.chat.completions.create(model=model.name, messages=messages, max_tokens=20, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    assert chunks[-1].usage.completion_tokens == len(ref_tokens)


async def test_repetition_penalty_logit_bias_stop_token_ids_and_min_p_reach_the_sampler(oai, model):
    """OpenAI's logit_bias and vLLM's sampling extensions (`repetition_penalty` over the prompt and
    the output, `stop_token_ids`, `min_p`), end to end."""
    prompt = [1, 17, 250, 33, 99, 5, 120, 5, 5]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                          repetition_penalty=1.8, pad_token_id=None)[0, len(prompt):].tolist()
        first_two = torch.topk(hf(ids).logits[0, -1], 2).indices.tolist()  # greedy's first choice, then its second
    args = dict(model=model.name, prompt=prompt, max_tokens=16, temperature=0)
    got = await oai.completions.create(**args, extra_body={"repetition_penalty": 1.8, "return_token_ids": True})
    plain = await oai.completions.create(**args, extra_body={"return_token_ids": True})
    assert got.choices[0].model_extra["token_ids"] == ref
    assert plain.choices[0].model_extra["token_ids"] != ref  # the penalty changed the answer
    # logit_bias (OpenAI's): -100 on greedy's first token makes transformers' second choice the first;
    # stop_token_ids (vLLM's): the answer ends with the first of them it produces
    plain_ids = plain.choices[0].model_extra["token_ids"]
    assert plain_ids[0] == first_two[0]
    banned = await oai.completions.create(**args, logit_bias={str(first_two[0]): -100},
                                          extra_body={"return_token_ids": True})
    assert banned.choices[0].model_extra["token_ids"][0] == first_two[1]
    cut = await oai.completions.create(**args, extra_body={"stop_token_ids": [plain_ids[5]], "return_token_ids": True})
    end = plain_ids.index(plain_ids[5]) + 1
    assert cut.choices[0].model_extra["token_ids"] == plain_ids[:end] and cut.choices[0].finish_reason == "stop"
    # min_p = 1 keeps only the likeliest token: sampling at temperature 1 must then be greedy
    only_best = await oai.completions.create(**(args | {"temperature": 1.0}),
                                             extra_body={"min_p": 1.0, "return_token_ids": True})
    assert only_best.choices[0].model_extra["token_ids"] == plain.choices[0].model_extra["token_ids"]


async def test_completion_logprobs_echo_stop_and_n(cluster, oai):
    c = oai
    base = await c.completions.create(model=cluster.model.name, prompt="abc", max_tokens=12, temperature=0,
                                      logprobs=3)
    lp = base.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    text = base.choices[0].text
    stop = text[3:6]
    if stop.strip():
        cut = await c.completions.create(model=cluster.model.name, prompt="abc", max_tokens=12, temperature=0,
                                         stop=[stop])
        assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    echo = await c.completions.create(model=cluster.model.name, prompt="abc", max_tokens=12, temperature=0,
                                      echo=True)
    assert echo.choices[0].text == "abc" + text
    # echo + logprobs (how lm-eval scores text): the prompt's tokens get logprobs too, the first None
    scored = await c.completions.create(model=cluster.model.name, prompt="abc", max_tokens=12, temperature=0,
                                        echo=True, logprobs=3)
    slp = scored.choices[0].logprobs
    n_prompt = len(slp.tokens) - 12
    assert n_prompt >= 2 and slp.token_logprobs[0] is None and slp.top_logprobs[0] is None
    assert all(lp <= 0 for lp in slp.token_logprobs[1:])
    assert slp.token_logprobs[n_prompt:] == lp.token_logprobs and slp.tokens[n_prompt:] == lp.tokens
    assert "".join(slp.tokens[:n_prompt]).endswith("abc") and slp.text_offset[n_prompt] == 3  # after a BOS
    assert slp.text_offset[:n_prompt] == sorted(slp.text_offset[:n_prompt])
    chunks = [ch async for ch in await c.completions.create(
        model=cluster.model.name, prompt="abc", max_tokens=4, temperature=0, echo=True, logprobs=3, stream=True)]
    opening = chunks[0].choices[0]
    assert opening.text == "abc" and opening.logprobs.token_logprobs == slp.token_logprobs[:n_prompt]
    many = await c.completions.create(model=cluster.model.name, prompt="abc", max_tokens=8, temperature=1.0,
                                      n=3, seed=5, extra_body={"return_token_ids": True})
    assert sorted(ch.index for ch in many.choices) == [0, 1, 2]
    assert many.usage.completion_tokens == sum(len(ch.model_extra["token_ids"]) for ch in many.choices)
    assert len({tuple(ch.model_extra["token_ids"]) for ch in many.choices}) > 1  # seeds differ per choice


async def test_a_batch_of_prompts_answers_as_each_prompt_alone(cluster, oai):
    """`prompt` as a list of prompts (lm-eval-harness and vLLM clients batch so): prompt p's j-th
    choice is choice p x n + j and is what that prompt alone answers, seed, echo and logprobs
    included, whole and streamed; usage counts each prompt once."""
    prompts, n = ["abc", [1, 17, 250, 33], "hello there"], 2
    args = dict(model=cluster.model.name, max_tokens=6, temperature=0.9, seed=11, n=n, logprobs=2, echo=True,
                extra_body={"return_token_ids": True})
    alone = [await oai.completions.create(prompt=p, **args) for p in prompts]
    batch = await oai.completions.create(prompt=prompts, **args)
    assert [ch.index for ch in batch.choices] == list(range(len(prompts) * n))
    for p, single in enumerate(alone):
        for j, expected in enumerate(single.choices):
            got = batch.choices[p * n + j]
            assert got.text == expected.text and got.model_extra["token_ids"] == expected.model_extra["token_ids"]
            assert got.logprobs.token_logprobs == expected.logprobs.token_logprobs
            assert got.logprobs.text_offset == expected.logprobs.text_offset
    assert batch.choices[0].text.startswith("abc") and len({ch.text for ch in batch.choices}) > len(prompts)
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    streamed: dict[int, str] = {}
    async for chunk in await oai.completions.create(prompt=prompts, stream=True, **args):
        for ch in chunk.choices:
            streamed[ch.index] = streamed.get(ch.index, "") + ch.text
    assert streamed == {ch.index: ch.text for ch in batch.choices}


async def _post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body, headers=headers or {}) as r:
        return r.status, await r.json()


async def test_tokenize_counts_what_a_request_is_charged_and_detokenize_reverses_it(cluster, oai, model):
    """vLLM's /tokenize and /detokenize (llama.cpp's field names too): the count of a prompt and of a
    conversation is the usage.prompt_tokens a request with them reports."""
    text, messages = "The quick brown fox", [{"role": "user", "content": "Hello there"}]
    whole = await oai.completions.create(model=model.name, prompt=text, max_tokens=1, temperature=0)
    chat = await oai.chat.completions.create(model=model.name, messages=messages, max_tokens=1, temperature=0)
    status, plain = await _post(f"{cluster.url}/tokenize", {"model": model.name, "prompt": text})
    assert status == 200 and plain["count"] == len(plain["tokens"]) == whole.usage.prompt_tokens
    assert plain["max_model_len"] == 128
    status, conversation = await _post(f"{cluster.url}/tokenize", {"messages": messages, "return_token_strs": True})
    assert conversation["count"] == chat.usage.prompt_tokens
    assert "".join(conversation["token_strs"]).endswith("Hello there<|im_end|>\n<|im_start|>assistant\n")
    status, back = await _post(f"{cluster.url}/detokenize", {"tokens": conversation["tokens"]})
    assert status == 200 and back["prompt"] == back["content"] == "".join(conversation["token_strs"])
    _, accents = await _post(f"{cluster.url}/tokenize", {"prompt": "naïve café", "add_special_tokens": False})
    _, back = await _post(f"{cluster.url}/detokenize", {"tokens": accents["tokens"]})
    assert back["prompt"] == "naïve café"
    status, llama_cpp = await _post(f"{cluster.url}/tokenize", {"content": text})  # no BOS unless add_special
    assert llama_cpp["tokens"] == load_tokenizer(model, load_config(model)).encode(text, add_special_tokens=False)
    for path, body, message in [("/tokenize", {"prompt": 5}, "has the wrong type"),
                                ("/tokenize", {}, "give 'prompt'"),
                                ("/tokenize", {"prompt": "x", "model": "other"}, "does not exist"),
                                ("/detokenize", {"tokens": [1, 999]}, "token ids in 0..383"),
                                ("/detokenize", {"tokens": "1 2"}, "has the wrong type")]:
        status, error = await _post(f"{cluster.url}{path}", body)
        assert status in (400, 404) and message in error["error"]["message"], (path, body, error)


async def test_tokenize_needs_the_api_key_as_v1_does(busy_cluster):
    status, error = await _post(f"{busy_cluster.url}/tokenize", {"prompt": "x"})
    assert status == 401 and "API key" in error["error"]["message"]
    status, ok = await _post(f"{busy_cluster.url}/detokenize", {"tokens": [5]}, {"Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and isinstance(ok["prompt"], str)


async def _stream_text(c, prompt: str) -> str:
    stream = await c.completions.create(prompt=prompt, model=None, max_tokens=24, temperature=0, stream=True)
    return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])


async def test_sixteen_concurrent_streams_equal_their_solo_runs(cluster, oai):
    c = oai
    prompts = [f"Request number {i}: " for i in range(16)]
    solo = [await _stream_text(c, p) for p in prompts]
    master = psutil.Process(cluster.proc.pid)
    rss_idle = master.memory_info().rss
    before = await _metrics(cluster)
    together = await asyncio.wait_for(asyncio.gather(*[_stream_text(c, p) for p in prompts]), 120)
    assert together == solo
    metrics = await _metrics(cluster)
    assert metrics["edge_requests_running"] == 0 and metrics["edge_queue_depth"] == 0
    steps = metrics["edge_cluster_steps_total"] - before["edge_cluster_steps_total"]
    rows = metrics["edge_cluster_step_rows_total"] - before["edge_cluster_step_rows_total"]
    assert rows > 1.5 * steps, (rows, steps)  # concurrent decode steps ran batched
    assert master.memory_info().rss - rss_idle < 64 * 2**20


async def _metrics(cluster) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(f"{cluster.url}/metrics") as r:
        text = await r.text()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line and not line.startswith("#") and "{" not in line}


async def test_queue_limit_answers_429_and_nothing_hangs(busy_cluster, busy_oai):
    c = busy_oai

    async def one(i):
        try:
            await c.completions.create(model=busy_cluster.model.name, prompt=f"x{i}", max_tokens=60,
                                       temperature=0, extra_body={"ignore_eos": True})
            return 200
        except openai.RateLimitError as e:
            assert e.response.headers["Retry-After"] == "1"
            assert e.body["code"] == "queue_full"
            return 429

    statuses = await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(16)]), 120)
    assert statuses.count(200) >= 6 and statuses.count(429) >= 1
    assert statuses.count(200) + statuses.count(429) == 16
    assert (await c.completions.create(model=busy_cluster.model.name, prompt="after", max_tokens=4)).choices


async def test_api_key_is_required_on_v1_but_not_health(busy_cluster, busy_oai):
    async with client(busy_cluster, "wrong") as wrong:
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
    assert (await busy_oai.models.list()).data
    async with aiohttp.ClientSession() as s, s.get(f"{busy_cluster.url}/health") as r:
        assert r.status == 200


async def test_disconnect_stops_generation_and_frees_the_slot(cluster, oai):
    before = await _metrics(cluster)
    body = {"prompt": "tell me everything", "max_tokens": 110, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{cluster.url}/v1/completions", json=body) as r:
            await r.content.readline()
            await r.content.readline()
        # the response is closed here, after two lines
    for _ in range(100):
        after = await _metrics(cluster)
        if after["edge_requests_cancelled_total"] > before["edge_requests_cancelled_total"]:
            break
        await asyncio.sleep(0.05)
    assert after["edge_requests_cancelled_total"] == before["edge_requests_cancelled_total"] + 1
    assert after["edge_requests_running"] == 0
    generated = after["edge_generated_tokens_total"] - before["edge_generated_tokens_total"]
    assert generated < 110  # it stopped early
    resp = await oai.completions.create(model=cluster.model.name, prompt="next", max_tokens=4)
    assert resp.choices[0].finish_reason in ("length", "stop")


BAD = [
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"prompt": 5}, 400, "'prompt' must be"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "'max_tokens' must be between"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400, "'max_tokens' must be between"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "'max_tokens' has the wrong type"),
    ("/v1/completions", {"prompt": "x", "temperature": 3}, 400, "'temperature' must be between"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "'top_p' must be between"),
    ("/v1/completions", {"prompt": "x", "logprobs": 9}, 400, "'logprobs' must be between"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "'n' must be between"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ("/v1/completions", {"prompt": "x", "stop": 7}, 400, "'stop' must be"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "'stream' has the wrong type"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": [5] * 200}, 413, "context window"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": 5}, 400, "'presence_penalty' must be between"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, 400, "'repetition_penalty' must be between"),
    ("/v1/completions", {"prompt": "x", "min_p": 1.5}, 400, "'min_p' must be between"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "min_p": "a"}, 400,
     "'min_p' has the wrong type"),
    ("/v1/chat/completions", {"messages": []}, 400, "'messages' must be"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "'role'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "'content'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 30}, 400,
     "'top_logprobs' must be between"),
    ("/v1/nothing", {}, 404, "Not Found"),
    # types, ranges and encodings a client can get wrong (none may reach the engine or answer 500)
    ("/v1/completions", {"prompt": "\ud800"}, 400, "not valid Unicode"),
    ("/v1/completions", {"prompt": "ok", "stop": ["\udfff"]}, 400, "not valid Unicode"),
    ("/v1/completions", {"prompt": []}, 400, "non-empty list of token ids"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, 400, "'prompt' must be"),
    ("/v1/completions", {"prompt": ["x", [1.5]]}, 400, "'prompt' must be"),
    ("/v1/completions", {"prompt": ["x"] * 33}, 400, "at most 32 in one request"),
    ("/v1/completions", {"prompt": ["x"] * 5, "n": 7}, 400, "35 choices; at most 32"),
    ("/v1/completions", {"prompt": [[1, 2], [99999]]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": [[1, 2], [99999]], "stream": True}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": [[5] * 200, [1]]}, 413, "the longest prompt has 200 tokens"),
    ("/v1/completions", {"prompt": [1.5]}, 400, "'prompt' must be"),
    ("/v1/completions", {"prompt": [True, 2]}, 400, "'prompt' must be"),
    ("/v1/completions", {"prompt": [-1]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": {"text": "x"}}, 400, "'prompt' must be"),
    ("/v1/completions", {}, 400, "'prompt' must be"),
    ("/v1/completions", {"prompt": "x", "seed": 10**30}, 400, "'seed' must be between"),
    ("/v1/completions", {"prompt": "x", "seed": -(2**63) - 1}, 400, "'seed' must be between"),
    ("/v1/completions", {"prompt": "x", "seed": 2**64 - 1, "n": 2}, 400, "'seed' must be between"),
    ("/v1/completions", {"prompt": "x", "seed": 2**63 - 1, "n": 2}, 400, "'seed' must be between"),
    ("/v1/completions", {"prompt": "x", "seed": "abc"}, 400, "'seed' has the wrong type"),
    ("/v1/completions", {"prompt": "x", "seed": True}, 400, "got a boolean"),
    ("/v1/completions", {"prompt": "x", "model": 5}, 400, "'model' must be a string"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "'max_tokens' must be between"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, 400, "'max_tokens' has the wrong type"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "got a boolean"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "'temperature' has the wrong type"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.1}, 400, "'temperature' must be between"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "'top_p' must be between"),
    ("/v1/completions", {"prompt": "x", "top_p": -1}, 400, "'top_p' must be between"),
    ("/v1/completions", {"prompt": "x", "top_k": -5}, 400, "'top_k' must be between"),
    ("/v1/completions", {"prompt": "x", "top_k": 2**21}, 400, "'top_k' must be between"),
    ("/v1/completions", {"prompt": "x", "n": 9}, 400, "'n' must be between"),
    ("/v1/completions", {"prompt": "x", "n": 2.0}, 400, "'n' has the wrong type"),
    ("/v1/completions", {"prompt": "x", "logprobs": -1}, 400, "'logprobs' must be between"),
    ("/v1/completions", {"prompt": "x", "logprobs": "3"}, 400, "'logprobs' has the wrong type"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, 400, "'echo' has the wrong type"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": 1}, 400, "'ignore_eos' has the wrong type"),
    ("/v1/completions", {"prompt": "x", "stream_options": "x"}, 400, "'stream_options' has the wrong type"),
    ("/v1/completions", {"prompt": "x", "stop": [1, 2]}, 400, "'stop' must be"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": -3}, 400, "'frequency_penalty' must be between"),
    ("/v1/completions", {"prompt": "x", "presence_penalty": "a"}, 400, "'presence_penalty' has the wrong type"),
    ("/v1/completions", {"prompt": "x", "return_token_ids": "no"}, 400, "'return_token_ids' has the wrong type"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "'messages' must be"),
    ("/v1/chat/completions", {"messages": [None]}, 400, "'role'"),
    ("/v1/chat/completions", {"messages": [{"role": 5, "content": "x"}]}, 400, "'role'"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "is not one of"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400,
     "needs a string 'text'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                          "image_url": {"url": "x"}}]}]},
     400, "'image_url' are not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ["hi"]}]}, 400, "are not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "not valid Unicode"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
     "'max_tokens' must be between"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": "yes"}, 400,
     "'logprobs' has the wrong type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": -1}, 400,
     "'top_logprobs' must be between"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400}]}, 413, "context window"),
    ("/v1/completions", {"prompt": [5] * 100, "max_tokens": 60}, 400, "160 in all, more than the context window of 128"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     400, "'tools' is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}}, 400, "'response_format' is not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, 400,
     "'tool_choice' is not supported"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "'logit_bias' must be between"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}, 400, "maps token ids (as strings) to numbers"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": True}}, 400, "maps token ids (as strings) to numbers"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "at most 300 tokens"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias token id 99999 is outside"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [1, "2"]}, 400, "'stop_token_ids' must be a list"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": 5}, 400, "'stop_token_ids' has the wrong type"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "'best_of' is not supported"),
    ("/v1/completions", {"prompt": "x", "suffix": "end"}, 400, "'suffix' is not supported"),
]

# Bodies no JSON encoder would write: raw bytes, odd headers, sizes.
BAD_RAW = [
    (b'{"prompt": "x"}', "application/json; charset=bogus", 400, "charset 'bogus' is not supported"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "nested too deeply"),
    (b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "application/json", 400, "not valid JSON"),
    (b'{"prompt": "\xff\xfe"}', "application/json", 400, "not valid JSON"),
    (b"", "application/json", 400, "not valid JSON"),
    (b"null", "application/json", 400, "JSON object"),
    (b'"just text"', "application/json", 400, "JSON object"),
    (b'{"prompt": "x", "temperature": NaN}', "application/json", 400, "'temperature' must be between"),
    (b'{"prompt": "x", "top_p": Infinity}', "application/json", 400, "'top_p' must be between"),
    (b'{"prompt": "' + b"x" * (9 << 20) + b'"}', "application/json", 413, "Request Entity Too Large"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD)
async def test_bad_input_gets_a_clear_error(cluster, path, body, status, message):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await _expect_error(cluster, path, data, "application/json", status, message)


@pytest.mark.parametrize(("data", "content_type", "status", "message"), BAD_RAW,
                         ids=[f"raw{i}" for i in range(len(BAD_RAW))])
async def test_malformed_bodies_get_a_clear_error(cluster, data, content_type, status, message):
    await _expect_error(cluster, "/v1/completions", data, content_type, status, message)


async def _expect_error(cluster, path: str, data: bytes, content_type: str, status: int, message: str) -> None:
    """One bad request: the status, the one error shape, and a server that still answers."""
    async with aiohttp.ClientSession() as s:
        body = io.BytesIO(data) if len(data) > 1 << 20 else data  # aiohttp warns on big raw bodies
        async with s.post(f"{cluster.url}{path}", data=body, headers={"Content-Type": content_type}) as r:
            assert r.status == status
            err = (await r.json())["error"]
        async with s.get(f"{cluster.url}/health") as r:
            assert r.status == 200
    assert message in err["message"], err
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in err["message"]


async def test_fields_that_ask_for_nothing_are_accepted(oai, cluster):
    """Clients send defaults of fields we do not implement; only a value that asks for something is refused."""
    resp = await oai.chat.completions.create(
        model=cluster.model.name, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0,
        tool_choice="none", response_format={"type": "text"}, logit_bias={})
    assert resp.choices[0].message.content is not None
    done = await oai.completions.create(model=cluster.model.name, prompt="hi", max_tokens=3, best_of=1, suffix="")
    assert done.usage.completion_tokens >= 1


async def test_stream_chunks_carry_null_usage_and_every_answer_a_system_fingerprint(cluster, model):
    """As OpenAI: with include_usage every chunk has `usage`, null until the last (empty choices) one;
    answers and chunks name the backend configuration in `system_fingerprint`."""
    body = {"model": model.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    chunks = []
    async with aiohttp.ClientSession() as s, s.post(f"{cluster.url}/v1/chat/completions", json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[6:]))
    assert len(chunks) >= 3
    assert all("usage" in ch and ch["usage"] is None for ch in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    fingerprints = {ch["system_fingerprint"] for ch in chunks}
    whole = {"model": model.name, "messages": body["messages"], "max_tokens": 2}
    async with aiohttp.ClientSession() as s, s.post(f"{cluster.url}/v1/chat/completions", json=whole) as r:
        answer = await r.json()
    assert len(fingerprints) == 1 and re.fullmatch(r"fp_[0-9a-f]{10}", answer["system_fingerprint"])
    assert fingerprints == {answer["system_fingerprint"]}
