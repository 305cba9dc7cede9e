"""The tokenizer a GGUF file describes in its metadata, rebuilt as a Hugging Face `tokenizer.json`.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and the
name of the pre-tokenizer (`tokenizer.ggml.pre`). The pre-tokenizer decides how text is cut before
BPE, so it must be the one the vocabulary was trained with (llama.cpp's `llama-vocab.cpp` regexes):
an unknown name is refused rather than guessed.
"""

from __future__ import annotations

from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from models.errors import CheckpointError

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # the GPT-2 regex


def _split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# tokenizer.ggml.pre -> (pre-tokenizer, ignore_merges): as llama.cpp cuts text for each vocabulary.
PRE_TOKENIZERS: dict[str, tuple[Any, bool]] = {
    "default": (_BYTE_LEVEL, False), "gpt-2": (_BYTE_LEVEL, False), "gpt2": (_BYTE_LEVEL, False),
    # SmolLM: every digit on its own, then GPT-2's regex (its tokenizer.json: Digits + ByteLevel).
    "smollm": (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _BYTE_LEVEL]), False),
    "llama-bpe": (_split_then_bytes(_LLAMA3_SPLIT), True), "llama3": (_split_then_bytes(_LLAMA3_SPLIT), True),
    "llama-v3": (_split_then_bytes(_LLAMA3_SPLIT), True), "smaug-bpe": (_split_then_bytes(_LLAMA3_SPLIT), True),
    "qwen2": (_split_then_bytes(_QWEN2_SPLIT), False),
    "deepseek-r1-qwen": (_split_then_bytes(_QWEN2_SPLIT), False),
}
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_level(meta: dict[str, Any], source: str) -> Tokenizer:
    """GPT-2-style byte-level BPE (Llama 3, Qwen2, SmolLM): tokens are already in the byte alphabet."""
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{source}: tokenizer pre-tokenizer {pre!r} is not supported "
                              f"(supported: {sorted(PRE_TOKENIZERS)})")
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    if not merges:
        raise CheckpointError(f"{source}: a byte-level (gpt2) tokenizer needs tokenizer.ggml.merges")
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece BPE vocabulary: every split of a token into two tokens,
    best-scored merged token first (how sentencepiece itself applies them)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores, strict=True):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        merges += [(left, right, score) for left, right in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(meta: dict[str, Any], source: str) -> Tokenizer:
    """Sentencepiece BPE with byte fallback (Llama 2, Mistral): spaces are '▁', unknown bytes <0xNN>."""
    tokens, scores = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.scores")
    if scores is None:
        raise CheckpointError(f"{source}: a sentencepiece (llama) tokenizer needs tokenizer.ggml.scores")
    merges = ([tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
              if meta.get("tokenizer.ggml.merges") else _spm_merges(tokens, list(scores)))
    unk = meta.get("tokenizer.ggml.unknown_token_id")
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, byte_fallback=True,
                               fuse_unk=True, unk_token=tokens[unk] if unk is not None else None))
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    steps = [normalizers.Prepend("\u2581")] if space_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if space_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *strip])
    return tok


BUILDERS = {"gpt2": _byte_level, "llama": _sentencepiece}


def _add_special_tokens(tok: Tokenizer, meta: dict[str, Any]) -> None:
    """Control tokens (<|im_end|>) are matched whole and skipped when decoding; user-defined ones
    (<think>) are matched whole too, as llama.cpp does."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types, strict=False) if kind == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types, strict=False) if kind == USER_DEFINED])


def _token(meta: dict[str, Any], key: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{key}")
    tokens = meta["tokenizer.ggml.tokens"]
    return tokens[token_id] if isinstance(token_id, int) and 0 <= token_id < len(tokens) else None


def build_tokenizer(meta: dict[str, Any], source: str) -> tuple[Tokenizer, dict[str, Any]]:
    """(tokenizer.json contents, tokenizer_config.json contents); raises CheckpointError naming
    what the file lacks or what is not supported."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in BUILDERS:
        raise CheckpointError(f"{source}: tokenizer model {kind!r} is not supported (supported: {sorted(BUILDERS)})")
    if not meta.get("tokenizer.ggml.tokens"):
        raise CheckpointError(f"{source}: the file has no tokenizer.ggml.tokens")
    tok = BUILDERS[kind](meta, source)
    _add_special_tokens(tok, meta)
    bos = _token(meta, "bos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")  # llama.cpp's default per model
    if add_bos and bos is not None:
        bos_id = meta["tokenizer.ggml.bos_token_id"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    settings = {"bos_token": bos, "eos_token": _token(meta, "eos_token_id"), "unk_token": _token(meta, "unknown_token_id"),
                "pad_token": _token(meta, "padding_token_id"), "add_bos_token": bool(add_bos),
                "chat_template": meta.get("tokenizer.chat_template"), "model_max_length": 1 << 30,
                "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    return tok, {k: v for k, v in settings.items() if v is not None}
