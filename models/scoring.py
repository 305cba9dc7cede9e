"""Log-probabilities of given tokens when the vocabulary is split across ranks (prompt scoring).

Each rank reduces its slice of the logits to a few numbers per position (max, log-sum-exp,
the target's logit if it is in the slice, its top k); the hub combines the slices into exact
log-softmax values without any rank sending whole logit rows.
"""

from __future__ import annotations

import torch

FIXED = 3  # columns before the top-k values and ids: max, log sum exp(x - max), target logit


def slice_scores(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int, k: int) -> torch.Tensor:
    """logits [S, V_r] of vocabulary rows vocab_start.., targets [S] (global ids) -> [S, 3 + 2k]."""
    logits = logits.float()
    top = logits.max(dim=-1).values  # [S]
    log_sum = torch.log(torch.exp(logits - top[:, None]).sum(dim=-1))  # [S]
    local = targets - vocab_start
    inside = (local >= 0) & (local < logits.shape[1])
    picked = logits.gather(1, local.clamp(0, logits.shape[1] - 1)[:, None])[:, 0]
    target = torch.where(inside, picked, torch.full_like(picked, float("-inf")))
    kk = min(k, logits.shape[1])
    values, ids = logits.topk(kk, dim=-1) if kk else (logits[:, :0], logits[:, :0].long())
    pad = k - kk
    values = torch.cat([values, torch.full((logits.shape[0], pad), float("-inf"))], dim=1)
    ids = torch.cat([(ids + vocab_start).float(), torch.full((logits.shape[0], pad), -1.0)], dim=1)
    return torch.cat([top[:, None], log_sum[:, None], target[:, None], values, ids], dim=1)


def combine_scores(parts: list[torch.Tensor], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """Slices of every rank ([S, 3 + 2k] each, in vocabulary order) -> per position the target's
    natural-log probability and the top k (id, logprob) over the whole vocabulary."""
    stacked = torch.stack(parts)  # [N, S, 3 + 2k]
    lse = torch.logsumexp(stacked[..., 0] + stacked[..., 1], dim=0)  # [S]
    target = stacked[..., 2].max(dim=0).values - lse  # the one rank holding it has it finite
    values = torch.cat(list(stacked[..., FIXED:FIXED + k]), dim=-1)  # [S, N*k]
    ids = torch.cat(list(stacked[..., FIXED + k:]), dim=-1)
    best, where = values.topk(k, dim=-1) if k else (values[:, :0], values[:, :0].long())
    best_ids = ids.gather(1, where)
    return [(float(target[i]), [(int(best_ids[i, j]), float(best[i, j] - lse[i])) for j in range(k)
                                if best_ids[i, j] >= 0])
            for i in range(target.shape[0])]
