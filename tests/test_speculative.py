"""Speculative decoding: the same greedy tokens and logprobs as decoding without drafts, on one
device and on 2 and 3 (in one process over loopback TCP); the same sampling distribution (a
chi-square test that wrong acceptance rules fail); drafts, policy and counters."""

import asyncio
import json
import re
from types import SimpleNamespace

import aiohttp
import openai
import pytest
import torch
from budgets import window_floor
from cluster_proc import ClusterProcess
from hf_reference import make_hf_checkpoint
from inprocess import cluster

import models.decoding
from edge_llm.cli import main
from models.drafting import DraftModel, Speculation, SpeculationSettings, ngram_lookup
from models.factory import make_model
from models.generation import LocalEngine, generate
from models.model import LocalModel
from models.sampling import SamplingParams, token_probs
from models.speculative import PROBE_EVERY, Draft, DraftPolicy

NEW = 24
# Prompts for the `tiny` preset (seed 0), found by running it: its greedy continuation of
# ACCEPTED repeats the prompt's last bigram's successor (every n-gram draft holds); of REJECTED
# it never follows the repetition the n-gram lookup proposes; MIXED is in between.
ACCEPTED, REJECTED, MIXED = [145, 458] * 5, [41, 265] * 5, [10, 11, 12, 13, 14] * 3
PROMPTS = [ACCEPTED, REJECTED, MIXED]
GREEDY = SamplingParams(max_tokens=NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def models_(tiny_model, tmp_path_factory):
    """The served tiny model, a second one (its drafts are always rejected), and the reference:
    greedy tokens and logprobs without speculation, per prompt."""
    other = make_model(tmp_path_factory.mktemp("other"), preset="tiny", seed=1)
    engine = LocalEngine(LocalModel(tiny_model))

    async def reference():
        return {tuple(p): await run(engine, p) for p in PROMPTS}

    refs = asyncio.run(reference())
    yield SimpleNamespace(folder=tiny_model, other=other, engine=engine, refs=refs)
    engine.close()


async def run(engine, prompt, speculation=None, params=GREEDY):
    events = [e async for e in generate(engine, prompt, params, speculation)]
    return [e.token_id for e in events], [e.logprob for e in events], events


def drafting(models_, source: str, engine) -> Speculation:
    """A fixed policy (drafts at every step, even when they fail) of `source`: ngram, the served
    model itself as its draft model (always right), or another model (always wrong)."""
    if source == "ngram":
        return Speculation("ngram", 4, adaptive=False)
    folder = models_.folder if source == "self" else models_.other
    return Speculation("draft", 4, adaptive=False, draft_model=DraftModel(folder, engine.config, engine.tokenizer))


def assert_same(got, ref):
    assert got[0] == ref[0]
    assert got[1] == pytest.approx(ref[1], abs=1e-4)


# --- drafts and the policy ------------------------------------------------------------------------

def test_ngram_lookup_takes_the_longest_earlier_match_with_room_for_k():
    assert ngram_lookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3], 2) == [7, 8]  # "2 3": after its latest occurrence
    assert ngram_lookup([2, 3, 9, 9, 2, 3, 2, 3], 3) == [9, 9, 2]  # ... the latest with 3 tokens after it
    assert ngram_lookup([1, 2, 3, 9, 4, 2, 3, 7, 1, 2, 3], 3) == [9, 4, 2]  # "1 2 3" beats a later "2 3"
    assert ngram_lookup([4, 5, 6, 4, 5], 4) == [6, 4, 5]  # only 3 follow the one match
    assert ngram_lookup([1, 2, 3, 4], 4) == [] and ngram_lookup([7], 4) == [] and ngram_lookup([1, 1], 0) == []


def test_adaptive_policy_drafts_while_it_pays_and_probes_when_it_does_not():
    policy = DraftPolicy(6)
    assert policy.next_k(remaining=100) == 0  # a plain step first: what does one cost?
    policy.observed_step(0.010)
    assert policy.next_k(remaining=100) > 0  # the prior acceptance is worth drafting
    assert policy.next_k(remaining=3) == 2  # never more than the budget can emit
    for _ in range(20):
        policy.observed_verify(4, 4, 0.012, 0.0)  # every draft held, a row costs 0.5 ms
    assert policy.next_k(100) == 6
    for _ in range(20):
        policy.observed_verify(4, 0, 0.012, 0.0)
    ks = [policy.next_k(100) for _ in range(PROBE_EVERY)]
    assert ks == [0] * (PROBE_EVERY - 1) + [1]  # off, but probes again
    assert DraftPolicy(3, adaptive=False).next_k(100) == 3


def test_settings_refuse_what_cannot_work():
    for bad in (SpeculationSettings("draft"), SpeculationSettings("ngram", draft_model="x"),
                SpeculationSettings("ngram", 0), SpeculationSettings("magic")):
        with pytest.raises(ValueError):
            bad.check()


def test_a_draft_model_with_another_tokenizer_is_refused(models_, tmp_path):
    folder = make_model(tmp_path / "m", preset="tiny", seed=1)
    path = folder / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[300:302]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two tokens' ids swapped
    path.write_text(json.dumps(tokenizer))
    with pytest.raises(ValueError, match="tokenizer"):
        DraftModel(folder, models_.engine.config, models_.engine.tokenizer)


# --- greedy: exactly the tokens of decoding without drafts ----------------------------------------

@pytest.mark.parametrize("source", ["ngram", "self", "other"])
async def test_one_device_gives_the_same_tokens(models_, source):
    for prompt in PROMPTS:
        spec = drafting(models_, source, models_.engine)
        got = await run(models_.engine, prompt, spec)
        assert_same(got, models_.refs[tuple(prompt)])
        stats = spec.stats
        assert stats.drafted > 0 and stats.tokens == NEW - 1  # the first token comes from the prefill
        if source == "self" or (source == "ngram" and prompt is ACCEPTED):
            assert stats.accepted == stats.drafted and stats.steps < stats.tokens / 2
        if source == "other" or (source == "ngram" and prompt is REJECTED):
            assert stats.accepted == 0 and stats.steps == stats.tokens


async def test_a_stop_string_inside_an_accepted_run_ends_there(models_):
    engine = models_.engine
    stop = SamplingParams(max_tokens=NEW, ignore_eos=True, stop=("-",))  # MIXED's third token has the first "-"
    plain = await run(engine, MIXED, params=stop)
    spec = drafting(models_, "self", engine)  # verifies tokens 1..5 in one step: the stop falls inside
    got = await run(engine, MIXED, spec, params=stop)
    assert got[0] == plain[0] and len(got[0]) == 3 and got[2][-1].finish_reason == "stop"
    assert [e.text for e in got[2]] == [e.text for e in plain[2]] and "-" not in "".join(e.text for e in got[2])
    assert spec.stats.drafted == 4 and spec.stats.accepted == 2  # drafted past the stop; used up to it


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("source", ["ngram", "self", "other"])
async def test_a_cluster_gives_the_same_tokens_with_requests_verified_in_one_batch(models_, world_size, source):
    async with cluster(models_.folder, world_size) as (engine, _, _):
        spec = drafting(models_, source, engine)
        results = await asyncio.gather(*(run(engine, p, spec) for p in PROMPTS))
        for prompt, got in zip(PROMPTS, results, strict=True):
            assert_same(got, models_.refs[tuple(prompt)])
        counters = engine.counters()
        assert counters.steps < counters.step_rows  # the requests' steps ran together
        stats = spec.stats
        if source == "other":  # every draft rejected: one token per step, as without drafts
            assert stats.drafted > 0 and stats.accepted == 0 and stats.steps == 3 * (NEW - 1)
        else:
            assert stats.accepted > 0 and stats.steps < 3 * (NEW - 1)


async def test_rejected_drafts_are_forgotten_on_the_attention_nodes(models_):
    async with cluster(models_.folder, 2, attention_nodes=1) as (engine, _, _):
        spec = drafting(models_, "ngram", engine)
        results = await asyncio.gather(*(run(engine.offloaded(), p, spec) for p in PROMPTS))
        for prompt, got in zip(PROMPTS, results, strict=True):
            assert_same(got, models_.refs[tuple(prompt)])
        assert spec.stats.drafted > spec.stats.accepted > 0 and engine.kv_rebuilds == 0


async def test_speculation_streams_layers_from_disk_under_a_memory_budget(tmp_path):
    folder = make_hf_checkpoint(tmp_path / "llama", "llama", seed=3, num_hidden_layers=4)
    budget = window_floor(folder, 2, tmp_path / "split") * 1.1 / (1 << 20)  # 2 of the 4 layers
    window = {"memory_budget_mb": budget, "split_dir": str(tmp_path / "split")}
    async with cluster(folder, 2, worker=window, **window) as (engine, _, _):
        spec = Speculation("ngram", 4, adaptive=False)
        for prompt in ([t % 300 for t in p] for p in PROMPTS):  # its vocabulary is smaller
            assert_same(await run(engine, prompt, spec), await run(engine, prompt))
        assert engine.counters().window[1]["bytes_read"] > 0  # rank 1 streamed its layers
        assert spec.stats.drafted > 0


# --- sampling: the distribution of decoding without drafts ----------------------------------------

VOCAB = 3
# A Markov "model": the next token's logits depend on the last token only, so the probability
# of every 3-token continuation is known exactly.
TABLE = torch.tensor([[0.5, -0.2, 1.0], [1.2, 0.1, -0.7], [-0.3, 0.9, 0.4]])
CHI2_26_P001 = 54.05  # chi-square critical value, 26 degrees of freedom, p = 0.001


class MarkovSession:
    def __init__(self):
        self.fed: list[int] = []

    async def step(self, tokens):
        self.fed += tokens
        return TABLE[self.fed[-1]].clone()

    async def verify(self, tokens):
        self.fed += tokens
        return TABLE[torch.tensor(tokens)].clone()  # [S, V]: the logits after each

    def rewind(self, length):
        del self.fed[length:]

    async def close(self):
        pass


class MarkovEngine:
    config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=64)
    tokenizer = SimpleNamespace(eos_ids=(), decode=lambda ids: "")

    def __init__(self):
        self.sessions = []

    async def open_session(self, capacity):
        self.sessions.append(MarkovSession())
        return self.sessions[-1]

    async def run_local(self, fn):
        return fn()


class PointDrafter:
    """Always drafts 0, 1, 2, ...: a point mass, as n-gram lookup is."""

    async def propose(self, context, k, params, gen):
        return Draft([i % VOCAB for i in range(k)])

    def close(self):
        pass


class SampledDrafter:
    """Draws each draft from a fixed distribution q unlike the model's (as a draft model does)."""

    Q = torch.tensor([0.6, 0.3, 0.1])

    async def propose(self, context, k, params, gen):
        tokens = [int(torch.multinomial(self.Q, 1, generator=gen)) for _ in range(k)]
        return Draft(tokens, [self.Q.clone() for _ in tokens])

    def close(self):
        pass


def exact_distribution(params: SamplingParams) -> dict[tuple[int, ...], float]:
    probs = [token_probs(TABLE[t], params) for t in range(VOCAB)]
    return {(a, b, c): float(probs[0][a] * probs[a][b] * probs[b][c])
            for a in range(VOCAB) for b in range(VOCAB) for c in range(VOCAB)}


async def chi_square(drafter, samples: int = 2000) -> float:
    params = SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True)
    engine, counts = MarkovEngine(), dict.fromkeys(exact_distribution(params), 0)
    spec = Speculation("ngram", 2, adaptive=False)
    spec.drafter = lambda run_local: drafter  # this test's drafter instead of the n-gram lookup
    for seed in range(samples):
        events = [e async for e in generate(engine, [0], SamplingParams(**{**params.__dict__, "seed": seed}), spec)]
        tokens = tuple(e.token_id for e in events)
        counts[tokens] += 1
        assert engine.sessions[-1].fed == [0, *tokens[:-1]]  # rejected drafts were forgotten
    expected = exact_distribution(params)
    return sum((counts[s] - samples * p) ** 2 / (samples * p) for s, p in expected.items())


@pytest.mark.parametrize("drafter", [PointDrafter(), SampledDrafter()], ids=["point", "sampled"])
async def test_sampling_with_drafts_keeps_the_distribution(drafter):
    assert await chi_square(drafter) < CHI2_26_P001


def _accept_every_draft(logits, params, gen, draft=None, q=None):
    return draft if draft is not None else int(torch.multinomial(token_probs(logits, params), 1, generator=gen))


def _redraw_from_p_on_rejection(logits, params, gen, draft=None, q=None):
    p = token_probs(logits, params)
    q_draft = 1.0 if q is None else float(q[draft]) if draft is not None else 1.0
    if draft is not None and float(torch.rand(1, generator=gen)) * q_draft < float(p[draft]):
        return draft
    return int(torch.multinomial(p, 1, generator=gen))  # wrong: the residual max(0, p - q) is right


@pytest.mark.parametrize("wrong_rule", [_accept_every_draft, _redraw_from_p_on_rejection])
@pytest.mark.parametrize("drafter", [PointDrafter(), SampledDrafter()], ids=["point", "sampled"])
async def test_the_chi_square_test_catches_a_wrong_acceptance_rule(monkeypatch, wrong_rule, drafter):
    monkeypatch.setattr(models.decoding, "choose_verified", wrong_rule)
    assert await chi_square(drafter) > CHI2_26_P001


# --- a real cluster (3 processes) and the command line --------------------------------------------

async def stream_completion(client, prompt) -> tuple[list[int], list[float]]:
    """A streamed greedy completion of token ids: the tokens and logprobs as they arrived."""
    tokens, logprobs = [], []
    stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=NEW, temperature=0,
                                             logprobs=1, stream=True, extra_body={"ignore_eos": True,
                                                                                  "return_token_ids": True})
    async for chunk in stream:
        choice = chunk.choices[0]
        tokens += (choice.model_extra or {}).get("token_ids") or []
        if choice.logprobs is not None:
            logprobs += choice.logprobs.token_logprobs
    return tokens, logprobs


async def test_a_served_cluster_streams_the_same_tokens_and_counts_drafts(models_, tmp_path):
    proc = ClusterProcess(models_.folder, 3, tmp_path, "--speculate", "ngram", "--draft-policy", "fixed",
                          "--served-name", "tiny")
    try:
        async with openai.AsyncOpenAI(base_url=f"{proc.url}/v1", api_key="none", max_retries=0, timeout=60) as c:
            results = await asyncio.gather(*(stream_completion(c, p) for p in PROMPTS))
        for prompt, got in zip(PROMPTS, results, strict=True):
            assert_same(got, models_.refs[tuple(prompt)])
        async with aiohttp.ClientSession() as s, s.get(f"{proc.url}/metrics") as r:
            metrics = await r.text()
        values = {m[1]: float(m[2]) for m in re.finditer(r"^(edge_spec_\w+) (\S+)$", metrics, re.M)}
        assert values["edge_spec_drafted_tokens_total"] > values["edge_spec_accepted_tokens_total"] > 0
        assert 1 < values["edge_spec_tokens_per_step"] and 0 < values["edge_spec_acceptance_rate"] < 1
    finally:
        proc.stop()


def test_generate_speculates_from_the_command_line(models_, capsys):
    args = ["generate", "--model", str(models_.folder), "--prompt-ids", ",".join(map(str, MIXED)),
            "--max-tokens", str(NEW), "--ignore-eos", "--json"]
    assert main([*args, "--draft-model", str(models_.folder)]) == 0  # --speculate draft implied
    got = json.loads(capsys.readouterr().out)
    assert_same((got["token_ids"], got["logprobs"]), models_.refs[tuple(MIXED)])
    assert main([*args, "--speculate", "ngram", "--draft-model", str(models_.folder)]) == 2
    assert "--draft-model is used by --speculate draft" in capsys.readouterr().err
