"""Where drafted tokens come from (models.speculative verifies them), and the server's setting.

- `ngram`: prompt lookup over the request itself (as vLLM's `ngram` speculator): the longest
  n-gram that ends the text so far and occurred before proposes the tokens that followed it. It
  costs microseconds and no memory, and pays on text that quotes its input (code edits,
  summaries with quotes, extraction).
- `draft`: a small checkpoint that shares the served model's tokenizer, run on the master device
  (its compute thread: `Engine.run_local`), drafting k tokens one by one over its own KV cache.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.config import LlamaConfig
from models.model import LocalModel
from models.sampling import SamplingParams, token_probs
from models.speculative import Draft, Drafter, DraftPolicy, SpeculationStats, StepCosts
from models.tokenizer import Tokenizer

SPECULATE_CHOICES = ("off", "ngram", "draft")
MAX_DRAFT_TOKENS = 16  # a verification step is padded to the widest row of its batch: keep rows short
NGRAM_MAX, NGRAM_MIN = 4, 2  # the n-gram lengths looked up, longest first

RunLocal = Callable[[Callable[[], object]], Awaitable[object]]


def ngram_lookup(context: list[int], k: int, n_max: int = NGRAM_MAX, n_min: int = NGRAM_MIN) -> list[int]:
    """Up to k tokens proposed by the longest n-gram (n_max down to n_min) that ends `context` and
    occurred earlier in it: the tokens after its latest earlier occurrence that has k after it (or
    after its earliest, which has the most). [] when none occurred."""
    if k <= 0:
        return []
    arr = np.asarray(context, dtype=np.int64)
    length = len(arr)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:length - 1], n)  # start i: arr[i:i+n]
        hits = np.flatnonzero((windows == arr[length - n:]).all(axis=1))
        if hits.size:
            full = hits[hits + n + k <= length]
            start = int(full[-1] if full.size else hits[0]) + n
            return arr[start:start + k].tolist()
    return []


class NgramDrafter:
    """A request's prompt-lookup drafter: nothing to hold, nothing to free."""

    async def propose(self, context: list[int], k: int, params: SamplingParams,
                      gen: torch.Generator | None) -> Draft:
        return Draft(ngram_lookup(context, k))

    def close(self) -> None:
        pass


class DraftModel:
    """A small checkpoint drafting for the served model; refuses one whose vocabulary differs."""

    def __init__(self, folder: str | Path, config: LlamaConfig, tokenizer: Tokenizer, dtype: str = "auto"):
        self.model = LocalModel(folder, dtype)
        if self.model.tokenizer.vocabulary() != tokenizer.vocabulary():
            raise ValueError(f"the draft model {folder} does not share the served model's tokenizer "
                             "(their vocabularies differ); a draft model must tokenize the same way")
        self.vocab_size = config.vocab_size  # the served model's logits width

    def session(self, run_local: RunLocal) -> DraftSession:
        return DraftSession(self, run_local)


def fit_vocab(logits: torch.Tensor, width: int) -> torch.Tensor:
    """The draft's logits [V_draft] cut or padded (-inf) to the served model's width."""
    if logits.numel() >= width:
        return logits[:width]
    return torch.cat([logits, logits.new_full((width - logits.numel(),), float("-inf"))])


class DraftSession:
    """A request's drafter on a DraftModel: its own KV cache over the tokens it has seen."""

    def __init__(self, draft: DraftModel, run_local: RunLocal):
        self.draft, self._run_local = draft, run_local
        self.kv = draft.model.new_cache(256)
        self.fed: list[int] = []  # the tokens whose keys and values `kv` holds

    async def propose(self, context: list[int], k: int, params: SamplingParams,
                      gen: torch.Generator | None) -> Draft:
        if k <= 0 or len(context) + k > self.draft.model.config.max_position_embeddings:
            return Draft([])
        return await self._run_local(lambda: self._draft(context, k, params, gen))  # type: ignore[return-value]

    def _draft(self, context: list[int], k: int, params: SamplingParams, gen: torch.Generator | None) -> Draft:
        model, width = self.draft.model, self.draft.vocab_size
        keep = 0
        while keep < min(len(self.fed), len(context) - 1) and self.fed[keep] == context[keep]:
            keep += 1
        self.kv.rewind(keep)  # forget what the served model rejected
        logits = model.forward(context[keep:], self.kv)  # [V_draft]
        self.fed = list(context)
        tokens, probs = [], []
        for i in range(k):
            logits = fit_vocab(logits, width)
            if params.temperature <= 0:
                token = int(torch.argmax(logits))
            else:
                probs.append(token_probs(logits, params))
                token = int(torch.multinomial(probs[-1], 1, generator=gen))
            tokens.append(token)
            if i + 1 < k:
                logits = model.forward([token], self.kv)
                self.fed.append(token)
        return Draft(tokens, probs or None)

    def close(self) -> None:
        self.kv = None  # type: ignore[assignment]


@dataclass
class Speculation:
    """The server's speculative decoding: where drafts come from (`method`), how many per step at
    most, whether the number adapts (models.speculative.DraftPolicy), and counters over every request."""

    method: str = "off"  # off | ngram | draft
    num_draft_tokens: int = 4
    adaptive: bool = True
    draft_model: DraftModel | None = None  # for method "draft"
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    costs: StepCosts = field(default_factory=StepCosts)  # what steps cost here, learnt from every request

    def __post_init__(self):
        if self.method not in SPECULATE_CHOICES:
            raise ValueError(f"speculation method {self.method!r}: choose one of {', '.join(SPECULATE_CHOICES)}")
        if self.method == "draft" and self.draft_model is None:
            raise ValueError("speculation with a draft model needs the draft model (--draft-model DIR)")

    @property
    def enabled(self) -> bool:
        return self.method != "off" and self.num_draft_tokens > 0

    def drafter(self, run_local: RunLocal) -> Drafter | None:
        """A new request's drafter (None: speculation is off)."""
        if not self.enabled:
            return None
        if self.method == "ngram":
            return NgramDrafter()
        return self.draft_model.session(run_local)  # type: ignore[union-attr]

    def policy(self) -> DraftPolicy:
        return DraftPolicy(self.num_draft_tokens, self.adaptive, self.costs)


@dataclass(frozen=True)
class SpeculationSettings:
    """What the command line (or a cluster file) asks for; `build` loads the draft model."""

    method: str = "off"
    num_draft_tokens: int = 4
    adaptive: bool = True
    draft_model: str | None = None  # a checkpoint folder, for method "draft"

    def check(self) -> None:
        """Raise ValueError (a user error) for settings that cannot work together."""
        if self.method not in SPECULATE_CHOICES:
            raise ValueError(f"speculate = {self.method!r} is not one of {list(SPECULATE_CHOICES)}")
        if not 1 <= self.num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"the number of draft tokens must be 1..{MAX_DRAFT_TOKENS}, not {self.num_draft_tokens}")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("--speculate draft needs --draft-model DIR (a small checkpoint with the same tokenizer)")
        if self.draft_model and self.method != "draft":
            raise ValueError(f"--draft-model is used by --speculate draft, not --speculate {self.method}")

    def build(self, config: LlamaConfig, tokenizer: Tokenizer) -> Speculation:
        """The server's Speculation for a model of `config` and `tokenizer`; raises ValueError and
        models.errors.CheckpointError for a draft model that cannot serve."""
        self.check()
        draft = DraftModel(self.draft_model, config, tokenizer) if self.method == "draft" else None
        return Speculation(self.method, self.num_draft_tokens, self.adaptive, draft)
