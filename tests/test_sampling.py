"""models.sampling against transformers' own logits processors (the oracle), and by hand."""

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
)

from models.sampling import SamplingParams, apply_penalties, token_probs


def logits(seed: int, vocab: int = 50) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3  # [V], both signs


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_is_transformers(penalty):
    x, sequence = logits(1), [0, 3, 7, 7, 19, 42, 3]  # prompt and output, repeats included
    ref = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([sequence]), x[None].clone())[0]
    got = apply_penalties(x, {}, SamplingParams(repetition_penalty=penalty), set(sequence))
    assert torch.equal(got, ref)
    assert not torch.equal(got, x)


def test_presence_and_frequency_penalties_subtract_per_generated_token():
    x, counts = logits(2), {4: 3, 9: 1}
    got = apply_penalties(x, counts, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    want = x.clone()
    want[4] -= 0.5 + 0.25 * 3
    want[9] -= 0.5 + 0.25 * 1
    assert torch.equal(got, want)


@pytest.mark.parametrize("min_p", [0.05, 0.2, 0.6])
def test_min_p_keeps_what_transformers_keeps(min_p):
    x = logits(3) / 4  # flat enough that every min_p keeps several tokens
    kept = torch.isfinite(MinPLogitsWarper(min_p)(torch.zeros(1, 1, dtype=torch.long), x[None].clone())[0])
    probs = token_probs(x, SamplingParams(temperature=1.0, min_p=min_p))
    assert torch.equal(probs > 0, kept) and 1 < int(kept.sum()) < x.numel()
    whole = torch.softmax(x, -1)
    assert torch.allclose(probs[kept], whole[kept] / whole[kept].sum())
