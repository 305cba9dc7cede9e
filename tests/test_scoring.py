"""Prompt scoring over a vocabulary split across ranks equals log_softmax over the whole of it."""

import pytest
import torch

from models.scoring import combine_scores, slice_scores


@pytest.mark.parametrize(("splits", "k"), [([50], 0), ([50], 3), ([20, 17, 13], 2), ([3, 40, 7], 5), ([2, 48], 4)])
def test_split_vocabulary_scores_equal_log_softmax(splits, k):
    gen = torch.Generator().manual_seed(len(splits) + k)
    logits = torch.randn(6, sum(splits), generator=gen) * 4
    targets = torch.randint(0, sum(splits), (6,), generator=gen)
    parts, start = [], 0
    for width in splits:
        parts.append(slice_scores(logits[:, start:start + width], targets, start, k))
        start += width
    scores = combine_scores(parts, k)
    expected = torch.log_softmax(logits, dim=-1)
    for i, (logprob, top) in enumerate(scores):
        assert logprob == pytest.approx(float(expected[i, targets[i]]), abs=1e-5)
        values, ids = expected[i].topk(k)
        assert [t for t, _ in top] == ids.tolist()
        assert [lp for _, lp in top] == pytest.approx(values.tolist(), abs=1e-5)


async def test_one_device_scores_a_prompt_like_transformers(tmp_path):
    from hf_reference import hf_prompt_logprobs, make_hf_checkpoint

    from models.generation import LocalEngine
    from models.model import LocalModel

    folder = make_hf_checkpoint(tmp_path / "llama", "llama", seed=3)
    prompt = [0, 17, 250, 33, 99, 5, 120]
    engine = LocalEngine(LocalModel(folder))
    try:
        scores = await engine.score(prompt, 2)
    finally:
        engine.close()
    chosen, top = hf_prompt_logprobs(folder, prompt, 2)
    assert [lp for lp, _ in scores] == pytest.approx(chosen, abs=1e-4)
    ours = [lp for _, t in scores for _, lp in t]
    assert ours == pytest.approx([lp for row in top for lp in row], abs=1e-4)
    assert await engine.score(prompt[:1], 2) == []  # a one-token prompt has nothing to score
